"""Unrolled (reverse-mode) hypergradients on gradient descent over a quadratic.

Reference: central finite differences (float64) of the closed-form iterate w_T
(tests.references.quadratic_gd_iterate); for truncation, of the K-step formula
with w_{T-K} held fixed.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import central_differences, compiled, rel_err
from tests.hypergrad.quadratic import GAMMA, Quadratic


def run(estimator, quad, mode, dtype=np.float64):
    params, hparams, inner_batch, target = quad.inputs(dtype)
    problem = quad.problem()
    fn = compiled(lambda p, h: estimator(problem, p, h, inner_batch, target), mode)
    return fn(params, hparams)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("per_step_b", [False, True])
def test_full_unroll_matches_finite_differences(mode, per_step_b):
    quad = Quadratic(num_steps=12, per_step_b=per_step_b)
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=12), quad, mode)
    fd = quad.finite_difference(quad.outer_after)
    for got, ref in zip(result.hypergrad, fd):
        assert rel_err(got, ref) < 1e-6
    # direct term: d/dc of gamma/2 ||c||^2 at fixed w_T; none for the learning rates.
    np.testing.assert_allclose(result.direct[0], GAMMA * quad.c, rtol=1e-12)
    np.testing.assert_array_equal(result.direct[1], 0.0)
    np.testing.assert_allclose(result.params[0], quad.iterate(quad.c, quad.lr, 12), rtol=1e-12)
    assert bool(result.is_finite)


@pytest.mark.parametrize("truncate", [1, 3])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_truncated_unroll_equals_k_step_formula(truncate, mode):
    quad = Quadratic(num_steps=10)
    T = 10
    w_start = quad.iterate(quad.c, quad.lr, T - truncate)  # held fixed by truncation
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=T, truncate=truncate), quad, mode)
    fd = quad.finite_difference(
        lambda c, lr: quad.outer_after(c, lr, start=T - truncate, w_start=w_start))
    for got, ref in zip(result.hypergrad, fd):
        assert rel_err(got, ref) < 1e-6
    # and it really differs from the full hypergradient (the test would otherwise be vacuous)
    full = quad.finite_difference(quad.outer_after)
    assert rel_err(result.hypergrad[0], full[0]) > 1e-3


def test_float32_close_to_float64_reference():
    quad = Quadratic(num_steps=12)
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=12), quad, "xla", np.float32)
    fd = quad.finite_difference(quad.outer_after)
    for got, ref in zip(result.hypergrad, fd):
        assert got.dtype == np.float32
        assert rel_err(got, ref) < 1e-4


# --------------------------------------------------------------------------- backward="mixed"

@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("per_step_b,truncate", [(False, None), (True, None), (True, 3)])
def test_mixed_backward_matches_finite_differences(mode, per_step_b, truncate):
    # Reference: central differences of the closed-form iterate (the K-step formula with
    # w_{T-K} fixed when truncated), as for the reverse backward above.
    T = 12
    quad = Quadratic(num_steps=T, per_step_b=per_step_b)
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=T, truncate=truncate, backward="mixed"),
                 quad, mode)
    if truncate is None:
        fd = quad.finite_difference(quad.outer_after)
    else:
        w_start = quad.iterate(quad.c, quad.lr, T - truncate)
        fd = quad.finite_difference(
            lambda c, lr: quad.outer_after(c, lr, start=T - truncate, w_start=w_start))
    for got, ref in zip(result.hypergrad, fd):
        assert rel_err(got, ref) < 1e-6
    np.testing.assert_allclose(result.params[0], quad.iterate(quad.c, quad.lr, T), rtol=1e-12)


def small_mlp_problem():
    """Per-example weighted squared loss of a 3-4-1 tanh MLP; phi: 6 example-weight logits."""
    import tensorflow as tf
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    x_val, y_val = rng.normal(size=(5, 3)), rng.normal(size=(5, 1))
    params = [rng.normal(size=(3, 4)) * 0.5, np.zeros(4), rng.normal(size=(4, 1)) * 0.5,
              np.zeros(1)]

    def predict(p, inputs):
        return tf.matmul(tf.tanh(tf.matmul(inputs, p[0]) + p[1]), p[2]) + p[3]

    def inner(p, h, batch):
        weights = tf.sigmoid(h[0])
        return tf.reduce_mean(weights * tf.reduce_sum((predict(p, batch[0]) - batch[1]) ** 2, 1))

    def outer(p, h, batch):
        return tf.reduce_mean((predict(p, batch[0]) - batch[1]) ** 2)

    return (km.BilevelProblem(inner, outer), params, [rng.normal(size=6)], (x, y),
            (x_val, y_val))


def eager_steps_finite_differences(problem, params, hparams, train, val, opt, T):
    """float64 central differences of the outer loss after T inner steps of ``opt``, each run
    eagerly by the optimizer's update (no estimator involved)."""

    def outer_after(logits):
        p, state = [tf.constant(v) for v in params], opt.init([tf.constant(v) for v in params])
        for _ in range(T):
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = problem.inner_loss(p, [tf.constant(logits)], train)
            p, state = opt.update(tape.gradient(loss, p), state, p)
        return float(problem.outer_loss(p, None, val))

    return central_differences(outer_after, [hparams[0]], h=1e-6)[0]


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_mixed_backward_through_stateful_optimizers_matches_finite_differences(optimizer):
    # Reference: float64 central differences of the outer loss after T inner steps, each run
    # eagerly by the optimizer's update (no estimator involved).
    problem, params, hparams, train, val = small_mlp_problem()
    opt = optim.adam(0.05) if optimizer == "adam" else optim.sgd(0.1, momentum=0.9)
    T = 6
    fd = eager_steps_finite_differences(problem, params, hparams, train, val, opt, T)
    for backward in ("mixed", "reverse"):
        result = compiled(lambda p, h: km.Unrolled(opt, num_steps=T, backward=backward)(
            problem, p, h, train, val), "graph")(params, hparams)
        assert rel_err(result.hypergrad[0], fd) < 1e-6, backward


@pytest.mark.parametrize("name", ["sgd", "nesterov_decay", "ema_momentum"])
def test_mixed_backward_without_stored_gradients_is_the_same_to_the_bit(name):
    # An update affine in the gradient (no optimizer hyperparameter overridden) is
    # differentiated at a zero gradient instead of the stored one. Reference: float64 central
    # differences of the outer loss after T eager steps, and the same estimator made to store
    # the gradients (affine_in_gradient=False), bit for bit.
    problem, params, hparams, train, val = small_mlp_problem()
    opt = {"sgd": optim.sgd(0.1),
           "nesterov_decay": optim.sgd(0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
           "ema_momentum": optim.ema_momentum_sgd(0.2, 0.7)}[name]
    assert opt.affine_in_gradient and not optim.adam().affine_in_gradient
    T = 5
    results = [compiled(lambda p, h, o=o: km.Unrolled(o, num_steps=T, backward="mixed")(
        problem, p, h, train, val), "graph")(params, hparams)
        for o in (opt, opt._replace(affine_in_gradient=False))]
    np.testing.assert_array_equal(results[0].hypergrad[0], results[1].hypergrad[0])
    # and the gradients are indeed not stored: one TensorArray (a TensorList in the graph)
    # fewer per parameter leaf
    arrays = [sum(op.type == "TensorListReserve" for op in tf.function(
        lambda p, h, o=o: km.Unrolled(o, num_steps=T, backward="mixed")(
            problem, p, h, train, val).hypergrad).get_concrete_function(
                [tf.constant(v) for v in params], [tf.constant(v) for v in hparams]
            ).graph.get_operations())
        for o in (opt, opt._replace(affine_in_gradient=False))]
    assert arrays[1] - arrays[0] == len(params), arrays
    fd = eager_steps_finite_differences(problem, params, hparams, train, val, opt, T)
    assert rel_err(results[0].hypergrad[0], fd) < 1e-6


def test_mixed_backward_keeps_the_unconnected_check_and_refuses_replicas():
    problem, params, hparams, train, val = small_mlp_problem()
    with pytest.raises(km.UnconnectedHyperparameterError):
        km.Unrolled(optim.sgd(0.1), num_steps=2, backward="mixed")(
            problem, params, hparams + [np.ones(2)], train, val)
    with pytest.raises(ValueError, match='backward="mixed" runs on one device'):
        km.Unrolled(optim.sgd(0.1), 2, backward="mixed", gradient_reduction=lambda g: g)
    with pytest.raises(ValueError, match="backward must be one of"):
        km.Unrolled(optim.sgd(0.1), 2, backward="forward")


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_one_step_through_gathers_is_dense_and_matches_finite_differences(mode):
    """Parameters and hyperparameters used through gathers (an embedding table, per-example
    weights picked by index): with one recorded step, traced without a loop, their gradients
    are IndexedSlices inside; the hypergradient comes out dense and equal to float64 central
    differences of the one-step objective written in NumPy."""
    rng = np.random.default_rng(0)
    table0 = rng.normal(size=(5, 3))
    w = rng.normal(size=3)
    idx, y = np.array([0, 2, 2, 4]), rng.normal(size=4)
    idx_val, y_val = np.array([1, 2, 4]), rng.normal(size=3)
    h0 = rng.normal(size=6)  # weights of 6 examples; the batch uses examples 0, 3, 3, 5
    pick = np.array([0, 3, 3, 5])
    lr = 0.3

    def inner(params, hparams, batch):
        pred = tf.linalg.matvec(tf.gather(params[0], idx), w)
        return tf.reduce_mean(tf.sigmoid(tf.gather(hparams[0], pick)) * (pred - y) ** 2)

    def outer(params, hparams, batch):
        pred = tf.linalg.matvec(tf.gather(params[0], idx_val), w)
        return tf.reduce_mean((pred - y_val) ** 2)

    def numpy_objective(h):
        s = 1 / (1 + np.exp(-h[pick]))
        residual = table0[idx] @ w - y
        grad = np.zeros_like(table0)
        for k, i in enumerate(idx):
            grad[i] += 2 * s[k] * residual[k] * w / len(idx)
        moved = table0 - lr * grad
        return np.mean((moved[idx_val] @ w - y_val) ** 2)

    estimator = km.Unrolled(optim.sgd(lr), num_steps=1)
    fn = compiled(lambda p, h: estimator(km.BilevelProblem(inner, outer), p, h, None,
                                         None).hypergrad, mode)
    got = fn([tf.constant(table0)], [tf.constant(h0)])[0]
    assert isinstance(got, tf.Tensor)
    (expected,) = central_differences(lambda h: numpy_objective(h), [h0])
    assert rel_err(got.numpy(), expected) < 1e-6
