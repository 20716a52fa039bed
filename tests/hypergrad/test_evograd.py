"""EvoGrad on its 1-D toy: train (x-1)^2 + lambda x^2, val (x-0.5)^2.

References: the true hypergradient (lambda-1)/(lambda+1)^3
(tests.references.evograd_toy_hypergradient) for the sign, and the one-step
SGD hypergradient at learning rate eta = sigma^2 (K-1) / (K tau), written out below,
for the mean in the small-sigma regime.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from tests import references


def toy_problem():
    def inner(params, hparams, batch):
        x = params[0]
        return tf.reduce_sum((x - 1.0) ** 2 + hparams[0] * x ** 2)

    def outer(params, hparams, batch):
        return tf.reduce_sum((params[0] - 0.5) ** 2)

    return km.BilevelProblem(inner, outer)


def one_step_hypergradient(x, lam, eta):
    """d/dlam (x' - 0.5)^2 with x' = x - eta * (2(x-1) + 2 lam x)."""
    x_new = x - eta * (2 * (x - 1) + 2 * lam * x)
    return 2 * (x_new - 0.5) * (-eta * 2 * x)


def mean_hypergradient(estimator, x, lam, draws):
    problem = toy_problem()

    @tf.function
    def call(seed):
        return estimator(problem, [tf.constant([x], tf.float64)], [tf.constant(lam, tf.float64)],
                         None, None, seed=seed).hypergrad[0]

    seeds = [tf.constant([i, 7], tf.int64) for i in range(draws)]
    return float(np.mean([call(s).numpy() for s in seeds]))


@pytest.mark.parametrize("lam", [0.1, 0.25, 0.5, 1.5, 2.0])
def test_sign_matches_true_hypergradient(lam):
    x_star = 1.0 / (1.0 + lam)  # the inner optimum
    estimator = km.EvoGrad(num_copies=2, sigma=0.05, temperature=0.05, noise="rademacher")
    mean = mean_hypergradient(estimator, x_star, lam, draws=200)
    assert np.sign(mean) == np.sign(references.evograd_toy_hypergradient(lam))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("x", [None, 0.2])  # at the optimum and away from it
def test_small_sigma_mean_equals_one_step_hypergradient(noise, x):
    lam = 0.5
    x = 1.0 / (1.0 + lam) if x is None else x
    estimator = km.EvoGrad(num_copies=4, sigma=1e-3, temperature=0.05, noise=noise)
    eta = estimator.effective_learning_rate
    assert eta == pytest.approx(1e-6 * 3 / (4 * 0.05))
    mean = mean_hypergradient(estimator, x, lam, draws=3000)
    expected = one_step_hypergradient(x, lam, eta)
    assert abs(mean - expected) < 0.05 * abs(expected), (mean, expected)


def test_stateful_generator_draws_fresh_noise_and_compiles():
    estimator = km.EvoGrad(num_copies=3, sigma=0.1, temperature=0.1, seed=1)
    problem = toy_problem()
    fn = tf.function(lambda: estimator(problem, [tf.constant([0.3], tf.float64)],
                                       [tf.constant(0.5, tf.float64)], None, None).hypergrad[0],
                     jit_compile=True)
    first, second = fn().numpy(), fn().numpy()
    assert np.isfinite(first) and np.isfinite(second) and first != second


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_perturbations_have_the_documented_law(noise):
    """Reference: the laws themselves. Rademacher: every value exactly +-sigma, each of the 32
    bit positions of a word balanced, copies uncorrelated; Gaussian: mean 0, std sigma; both:
    the same draw in float32 and float64, with and without XLA only up to the kernel's own
    numbers (shape and law checked)."""
    from keras_metapt.hypergrad.evograd import perturbations
    sigma, copies, shape = 0.01, 3, (257, 33)  # 8,481 elements: not a multiple of 32
    seed = tf.constant([5, 9], tf.int64)
    eps = perturbations(tf.zeros(shape), seed, copies, sigma, noise).numpy()
    assert eps.shape == (copies,) + shape
    flat = eps.reshape(copies, -1) / sigma
    n = flat.shape[1]
    bound = 5 / np.sqrt(n)  # five standard errors of a mean of n unit-variance values
    if noise == "rademacher":
        np.testing.assert_array_equal(np.abs(flat), 1.0)
        for j in range(32):  # sign j of every word
            assert abs(flat[:, j::32].mean()) < 5 / np.sqrt(flat[:, j::32].size)
    else:
        assert abs(flat.std() - 1) < 0.03
    assert np.all(np.abs(flat.mean(axis=1)) < bound)
    for a in range(copies):
        for b in range(a):
            assert abs(np.mean(flat[a] * flat[b])) < bound
    wide = perturbations(tf.zeros(shape, tf.float64), seed, copies, sigma, noise).numpy()
    np.testing.assert_allclose(wide, eps, rtol=1e-6)
    compiled = tf.function(lambda s: perturbations(tf.zeros(shape), s, copies, sigma, noise),
                           jit_compile=True)(seed).numpy()
    assert compiled.shape == eps.shape and abs(compiled.std() / sigma - 1) < 0.03


def test_inner_loss_at_points_gives_every_copy_the_others_losses():
    """``BilevelProblem.inner_loss_at_points``: the copies' losses from one call.

    Reference, written out in float64 with the estimator's documented Gaussian draws
    (tests/hyper/test_example_weights.evograd_noise): copies x_k = x + sigma eps_k,
    l_k = (x_k - 1)^2 + lam x_k m with m = mean_j x_j (stopped), w = softmax(-l / tau),
    x* = sum_k w_k x_k; d/dlam (x* - 0.5)^2 = 2 (x* - 0.5) sum_k x_k dw_k/dlam with
    dw_k/dlam = -w_k (x_k m - sum_j w_j x_j m) / tau. A hook that stacks ``inner_loss`` per
    point gives the per-copy result exactly."""
    from tests.hyper.test_example_weights import evograd_noise
    x, lam, sigma, tau, copies = 0.3, 0.5, 0.2, 0.1, 3
    seed = tf.constant([5, 9], tf.int64)

    def at_points(points, hparams, batch):
        xs = tf.stack([p[0][0] for p in points])
        m = tf.stop_gradient(tf.reduce_mean(xs))
        return (xs - 1.0) ** 2 + hparams[0] * xs * m

    plain = toy_problem()
    hooked = km.BilevelProblem(plain.inner_loss, plain.outer_loss, inner_loss_at_points=at_points)
    stacked = km.BilevelProblem(plain.inner_loss, plain.outer_loss,
                                inner_loss_at_points=lambda points, h, b: tf.stack(
                                    [plain.inner_loss(p, h, b) for p in points]))
    estimator = km.EvoGrad(num_copies=copies, sigma=sigma, temperature=tau)

    def hypergrad(problem):
        return estimator(problem, [tf.constant([x], tf.float64)], [tf.constant(lam, tf.float64)],
                         None, None, seed=seed).hypergrad[0].numpy()

    xs = x + np.array([n[0][0] for n in evograd_noise(seed, [(1,)], copies, 1.0)]) * sigma
    m = xs.mean()
    losses = (xs - 1) ** 2 + lam * xs * m
    w = np.exp(-(losses - losses.min()) / tau)
    w /= w.sum()
    dl = xs * m
    dw = -w * (dl - np.sum(w * dl)) / tau
    expected = 2 * (np.sum(w * xs) - 0.5) * np.sum(xs * dw)
    np.testing.assert_allclose(hypergrad(hooked), expected, rtol=1e-10)
    assert hypergrad(stacked) == hypergrad(plain)


def test_inner_loss_at_points_must_return_one_loss_per_point():
    plain = toy_problem()
    bad = km.BilevelProblem(plain.inner_loss, plain.outer_loss,
                            inner_loss_at_points=lambda points, h, b: tf.zeros([len(points) + 1],
                                                                                tf.float64))
    integer = km.BilevelProblem(plain.inner_loss, plain.outer_loss,
                                inner_loss_at_points=lambda points, h, b: tf.zeros([2], tf.int32))
    for problem, message in ((bad, r"one loss per point, a \[2\] tensor; got shape \(3,\)"),
                             (integer, "must return floating losses, got int32")):
        with pytest.raises(km.errors.InputMismatchError, match=message):
            km.EvoGrad(num_copies=2)(problem, [tf.constant([0.3], tf.float64)],
                                     [tf.constant(0.5, tf.float64)], None, None,
                                     seed=tf.constant([1, 2], tf.int64))
