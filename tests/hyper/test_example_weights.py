"""Meta-Weight-Net example weights, and the hypergradients of a Meta-Weight-Net step.

References:
- the weights and the normalised weighted loss: NumPy transcriptions of
  v = sigmoid(W2 relu(W1 l + b1) + b2) and sum l v / sum v (Shu et al. 2019, Eq. 3-4 and
  their code's normalisation); with the losses' gradient kept, float64 central differences
  of that transcription;
- the gradient with respect to the model: the closed form sum_i v_i dl_i/dtheta / sum v for a
  softmax regression (the network's input is the detached loss);
- EvoGrad and the one-step (Unrolled, T=1) hypergradients of a Meta-Weight-Net weighted
  softmax regression: central finite differences in float64 of an independent NumPy
  computation of the same objective (EvoGrad: L_val(sum_k softmax(-l/tau)_k theta_k) with
  the estimator's documented noise draws; one step: L_val(theta - lr grad L_train));
- the implicit (Neumann) hypergradient: the series written out in NumPy with a
  finite-difference Hessian of the closed-form gradient.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from keras_metapt.hyper import MetaWeightNet, meta_weight_net_weights, normalised_weighted_loss

C, D, H = 3, 4, 5  # classes, features, MWN hidden units


def np_mwn(hparams, losses):
    w1, b1, w2, b2 = hparams
    hidden = np.maximum(losses[:, None] @ w1 + b1, 0.0)
    return 1.0 / (1.0 + np.exp(-((hidden @ w2)[:, 0] + b2[0])))


def np_cross_entropy(theta, x, y):
    w, b = theta
    logits = x @ w + b
    logits = logits - logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_p[np.arange(len(y)), y]


def np_weighted_loss(theta, mwn, x, y):
    losses = np_cross_entropy(theta, x, y)
    v = np_mwn(mwn, losses)
    return np.sum(losses * v / v.sum())


def random_problem(seed=0, n=8):
    rng = np.random.default_rng(seed)
    theta = [rng.normal(size=(D, C)) * 0.5, rng.normal(size=C) * 0.1]
    mwn = [rng.normal(size=(1, H)), rng.normal(size=H), rng.normal(size=(H, 1)) * 0.5,
           rng.normal(size=1) * 0.1]
    train = (rng.normal(size=(n, D)), rng.integers(0, C, n))
    val = (rng.normal(size=(n, D)), rng.integers(0, C, n))
    return theta, mwn, train, val


def np_weighted_gradient(theta, mwn, x, y, v=None):
    """Closed form for softmax regression: sum_i v_i (p_i - onehot_i) x_i / sum v, the weights
    v = MWN(l(theta)) taken as constants (the network's input is the detached loss), or the
    ``v`` given."""
    logits = x @ theta[0] + theta[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if v is None:
        v = np_mwn(mwn, np_cross_entropy(theta, x, y))
    delta = (p - np.eye(C)[y]) * (v / v.sum())[:, None]
    return [x.T @ delta, delta.sum(0)]


def one_step_objective(theta, train, val, lr):
    """phi -> L_val(theta - lr grad L_train(theta, phi)): the one-step look-ahead."""
    def objective(mwn_values):
        g = np_weighted_gradient(theta, mwn_values, *train)
        return np.mean(np_cross_entropy([a - lr * b for a, b in zip(theta, g)], *val))
    return objective


def evograd_objective(theta, train, val, noise, tau):
    """phi -> L_val(sum_k softmax(-l / tau)_k theta_k), theta_k = theta + noise_k."""
    thetas = [[a + e for a, e in zip(theta, copy)] for copy in noise]

    def objective(mwn_values):
        losses = np.array([np_weighted_loss(t, mwn_values, *train) for t in thetas])
        w = np.exp(-(losses - losses.min()) / tau)
        w /= w.sum()
        combined = [sum(w[k] * t[i] for k, t in enumerate(thetas)) for i in range(2)]
        return np.mean(np_cross_entropy(combined, *val))
    return objective


def tf_cross_entropy(theta, x, y):
    logits = tf.matmul(x, theta[0]) + theta[1]
    return -tf.reduce_sum(tf.one_hot(y, C, dtype=logits.dtype) * tf.nn.log_softmax(logits), -1)


def tf_problem():
    def inner(theta, mwn, batch):
        losses = tf_cross_entropy(theta, *batch)
        return normalised_weighted_loss(losses, meta_weight_net_weights(mwn, losses))

    def outer(theta, mwn, batch):
        return tf.reduce_mean(tf_cross_entropy(theta, *batch))
    return inner, outer


def central_difference(f, leaves, eps=1e-6):
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros_like(leaf)
        for j in np.ndindex(leaf.shape):
            def shifted(delta):
                moved = [x.copy() for x in leaves]
                moved[i][j] += delta
                return f(moved)
            g[j] = (shifted(eps) - shifted(-eps)) / (2 * eps)
        grads.append(g)
    return grads


def test_weights_and_weighted_loss_match_numpy():
    theta, mwn, (x, y), _ = random_problem()
    losses = np_cross_entropy(theta, x, y)
    v = meta_weight_net_weights([tf.constant(m) for m in mwn], tf.constant(losses)).numpy()
    np.testing.assert_allclose(v, np_mwn(mwn, losses), rtol=1e-12)
    loss = normalised_weighted_loss(tf.constant(losses), tf.constant(v)).numpy()
    np.testing.assert_allclose(loss, np.sum(losses * v) / np.sum(v), rtol=1e-12)
    # weights summing to zero are used as they are (the original's guard)
    zero = normalised_weighted_loss(tf.constant([1.0, 2.0]), tf.constant([0.0, 0.0])).numpy()
    assert zero == 0.0


def test_weights_with_the_loss_gradient_kept_match_central_differences():
    """``stop_loss_gradient=False``: the same weights, and their gradient in the losses against
    float64 central differences of the NumPy formula (with it stopped, that gradient is 0)."""
    _, mwn, _, _ = random_problem(3)
    losses = np.array([0.1, 0.7, 1.3, 2.9])
    probe = np.arange(1.0, 5.0)
    tensors = [tf.constant(m) for m in mwn]
    x = tf.constant(losses)
    gradients = {}
    for stop in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            v = meta_weight_net_weights(tensors, x, stop_loss_gradient=stop)
            total = tf.reduce_sum(v * probe)
        np.testing.assert_allclose(v.numpy(), np_mwn(mwn, losses), rtol=1e-12)
        gradients[stop] = tape.gradient(total, x)
    assert gradients[True] is None
    eps = 1e-6
    differences = [(np_mwn(mwn, losses + eps * e) - np_mwn(mwn, losses - eps * e)) @ probe
                   / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(gradients[False].numpy(), differences, rtol=1e-6, atol=1e-10)
    assert np.abs(differences).max() > 1e-3  # the path carries a gradient here


def test_model_gradient_is_the_weighted_gradient_with_the_weights_held_fixed():
    theta, mwn, (x, y), _ = random_problem(1)
    inner, _ = tf_problem()
    t = [tf.constant(a) for a in theta]
    with tf.GradientTape() as tape:
        tape.watch(t)
        loss = inner(t, [tf.constant(m) for m in mwn], (tf.constant(x), tf.constant(y)))
    g_w, g_b = tape.gradient(loss, t)
    # closed form for softmax regression: dl_i/dlogits = p_i - onehot_i
    logits = x @ theta[0] + theta[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v = np_mwn(mwn, np_cross_entropy(theta, x, y))
    delta = (p - np.eye(C)[y]) * (v / v.sum())[:, None]
    np.testing.assert_allclose(g_w.numpy(), x.T @ delta, rtol=1e-10)
    np.testing.assert_allclose(g_b.numpy(), delta.sum(0), rtol=1e-10)


def test_layer_initialises_like_pytorch_linear_and_round_trips_its_config():
    layer = MetaWeightNet(hidden=100, seed=3)
    k1, b1, k2, b2 = (v.numpy() for v in layer.hparams())
    assert k1.shape == (1, 100) and k2.shape == (100, 1)
    assert np.abs(k1).max() <= 1.0 and np.abs(b1).max() <= 1.0      # +-1/sqrt(fan_in = 1)
    assert np.abs(k2).max() <= 0.1 and np.abs(b2).max() <= 0.1      # +-1/sqrt(100)
    assert np.abs(k1).max() > 0.5  # spread over the interval, not a narrow default
    # every weight its own draw (equal seeds would give bias1 == kernel1, bias2 == kernel2[0])
    assert not np.allclose(k1.ravel(), b1) and not np.isclose(b2[0], k2[0, 0])
    losses = np.linspace(0, 5, 7).astype(np.float32)
    np.testing.assert_allclose(layer(tf.constant(losses)).numpy(),
                               np_mwn([k1, b1, k2, b2], losses), rtol=1e-5)
    clone = MetaWeightNet.from_config(layer.get_config())
    assert clone.hidden == 100 and clone.seed == 3
    with pytest.raises(ValueError, match="hidden"):
        MetaWeightNet(hidden=0)


def evograd_noise(seed, shapes, copies, sigma):
    """The estimator's documented draws: one stateless Philox seed per leaf, split from the
    call's seed; per leaf one standard-normal float32 draw of shape [copies, *shape], copy k
    taking row k; times sigma."""
    seeds = tf.random.experimental.stateless_split(seed, len(shapes))
    draws = [tf.random.stateless_normal((copies,) + tuple(shape), seeds[i], dtype=tf.float32,
                                        alg="philox").numpy().astype(np.float64)
             for i, shape in enumerate(shapes)]
    return [[sigma * d[k] for d in draws] for k in range(copies)]


def test_evograd_meta_weight_net_hypergradient_matches_numpy_finite_differences():
    theta, mwn, train, val = random_problem(2)
    copies, sigma, tau = 3, 0.1, 0.5
    seed = tf.constant([7, 11], tf.int64)
    objective = evograd_objective(theta, train, val,
                                  evograd_noise(seed, [a.shape for a in theta], copies, sigma),
                                  tau)
    inner, outer = tf_problem()
    estimator = km.EvoGrad(num_copies=copies, sigma=sigma, temperature=tau)
    result = estimator(km.BilevelProblem(inner, outer), [tf.constant(a) for a in theta],
                       [tf.constant(m) for m in mwn], tuple(map(tf.constant, train)),
                       tuple(map(tf.constant, val)), seed=seed)
    expected = central_difference(objective, [m.copy() for m in mwn])
    assert max(np.abs(e).max() for e in expected) > 1e-4  # the weights do matter here
    for got, want in zip(result.hypergrad, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)


def test_one_step_meta_weight_net_hypergradient_matches_numpy_finite_differences():
    theta, mwn, train, val = random_problem(3)
    inner, outer = tf_problem()
    result = km.Unrolled(optim.sgd(0.5), num_steps=1)(
        km.BilevelProblem(inner, outer), [tf.constant(a) for a in theta],
        [tf.constant(m) for m in mwn], tuple(map(tf.constant, train)),
        tuple(map(tf.constant, val)))
    expected = central_difference(one_step_objective(theta, train, val, 0.5),
                                  [m.copy() for m in mwn])
    assert max(np.abs(e).max() for e in expected) > 1e-4
    for got, want in zip(result.hypergrad, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)


def test_implicit_meta_weight_net_hypergradient_matches_numpy_neumann():
    """-(d/dphi) grad_theta L_train(theta, phi) . u with u = alpha sum_{j=0..n} (I - alpha H)^j
    g_val: H by central differences of the closed-form gradient with the weights v held at
    their values at theta (the detached input makes them constants of the inner loss), the phi
    derivative by central differences of u . gradient (u held fixed)."""
    theta, mwn, train, val = random_problem(4)
    alpha, n = 0.3, 3
    split = theta[0].size

    def flat_gradient(flat_theta, mwn_values, data=train, v=None):
        t = [flat_theta[:split].reshape(theta[0].shape), flat_theta[split:]]
        return np.concatenate([g.ravel() for g in np_weighted_gradient(t, mwn_values, *data, v)])

    flat = np.concatenate([a.ravel() for a in theta])
    v_here = np_mwn(mwn, np_cross_entropy(theta, *train))
    hessian = np.stack([(flat_gradient(flat + e, mwn, v=v_here)
                         - flat_gradient(flat - e, mwn, v=v_here)) / 2e-6
                        for e in 1e-6 * np.eye(len(flat))], axis=1)
    # the validation loss is the plain mean: the weighted gradient with equal weights
    equal = [np.zeros((1, H)), np.zeros(H), np.zeros((H, 1)), np.zeros(1)]
    g_val = flat_gradient(flat, equal, val)
    term, u = g_val, g_val.copy()
    for _ in range(n):
        term = term - alpha * hessian @ term
        u = u + term
    u = alpha * u
    expected = central_difference(lambda m: -flat_gradient(flat, m) @ u, [m.copy() for m in mwn])

    inner, outer = tf_problem()
    result = km.Implicit(km.linalg.neumann(n, alpha=alpha))(
        km.BilevelProblem(inner, outer), [tf.constant(a) for a in theta],
        [tf.constant(m) for m in mwn], tuple(map(tf.constant, train)),
        tuple(map(tf.constant, val)))
    assert max(np.abs(e).max() for e in expected) > 1e-4
    for got, want in zip(result.hypergrad, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-8)
