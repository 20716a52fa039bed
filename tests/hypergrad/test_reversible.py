"""Exact reversible learning (`hypergrad.Reversible`, Maclaurin, Duvenaud & Adams 2015).

References: the forward recurrence of the paper's Algorithm 1 written out in NumPy below
(float64, real-valued gamma) with central finite differences for the hypergradients; the
`Unrolled` estimator (backpropagation through the stored steps, float64) on the same steps
(`optim.ema_momentum_sgd`); bit equality of the reversed trajectory with the starting integers;
the bits-per-step formula sum_t log2(d / n_t) for the information buffer.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_metapt as km
from keras_metapt.hyper import piecewise_constant
from tests.conftest import central_differences, compiled, rel_err

# --- a quadratic with schedules, initial scale and a curvature hyperparameter -------------

D, T, BLOCKS = 4, 24, 3
RNG = np.random.default_rng(7)
_M = RNG.normal(size=(D, D))
A = _M @ _M.T / D + 0.3 * np.eye(D)
BVEC = RNG.normal(size=(T, D))
TARGET = RNG.normal(size=D)
W_RAW = RNG.normal(size=D)
V0 = 0.1 * RNG.normal(size=D)
LR = np.array([0.3, 0.45, 0.2])
MOMENTUM = np.array([0.5, 0.875, 0.75])     # multiples of 2^-16: used exactly
LOG_C = 0.3 * RNG.normal(size=D) - 1.0
SCALE = np.array([0.8])


def numpy_outer(lr, momentum, log_c, scale):
    """Algorithm 1 of the paper in NumPy: g = (A + diag(e^c)) w - b_t;
    v <- gamma v - (1 - gamma) g; w <- w + alpha v; then 1/2 ||w - target||^2 + 1/2 ||c||^2."""
    w, v = scale[0] * W_RAW, V0.copy()
    for t in range(T):
        k = (t * BLOCKS) // T
        g = (A + np.diag(np.exp(log_c))) @ w - BVEC[t]
        v = momentum[k] * v - (1 - momentum[k]) * g
        w = w + lr[k] * v
    return 0.5 * np.sum((w - TARGET) ** 2) + 0.5 * np.sum(log_c ** 2)


def quadratic_problem():
    def inner(params, hparams, b):
        w = params[0]
        curvature = tf.constant(A) + tf.linalg.diag(tf.exp(hparams["log_c"]))
        return 0.5 * tf.tensordot(w, tf.linalg.matvec(curvature, w), 1) - tf.tensordot(b, w, 1)

    def outer(params, hparams, target):
        return (0.5 * tf.reduce_sum((params[0] - target) ** 2)
                + 0.5 * tf.reduce_sum(hparams["log_c"] ** 2))

    def schedule(h, t, num_steps):
        return {"learning_rate": piecewise_constant(h["lr"], t, num_steps),
                "momentum": piecewise_constant(h["momentum"], t, num_steps)}

    return km.BilevelProblem(inner, outer, inner_optimizer_hparams=schedule)


def scaled_start(params, hparams):
    return [hparams["scale"][0] * params[0]]


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_hypergradient_matches_numpy_algorithm_and_unrolled(mode):
    problem = quadratic_problem()
    hparams = {"lr": LR, "momentum": MOMENTUM, "log_c": LOG_C, "scale": SCALE}
    batches = km.StepBatches(tf.constant(BVEC))
    est = km.Reversible(T, initial_params=scaled_start)
    result = compiled(lambda h: est(problem, [W_RAW], h, batches, TARGET, opt_state=[V0]),
                      mode)(hparams)
    fd = central_differences(numpy_outer, [LR, MOMENTUM, LOG_C, SCALE])
    for name, ref in zip(["lr", "momentum", "log_c", "scale"], fd):
        assert rel_err(result.hypergrad[name], ref) < 1e-6, name
    # Unrolled on the same steps, started at the scaled weights (no init-scale hyperparameter).
    fixed = {k: v for k, v in hparams.items() if k != "scale"}
    start = [SCALE[0] * W_RAW]
    unrolled = km.Unrolled(est.optimizer, T)(problem, start, fixed, batches, TARGET,
                                              opt_state=[V0])
    plain = km.Reversible(T)(problem, start, fixed, batches, TARGET, opt_state=[V0])
    for name in fixed:
        assert rel_err(plain.hypergrad[name], unrolled.hypergrad[name]) < 1e-6, name
    # The fixed point rounds gamma v to within 2^(16 - 48) per step (the popped digit).
    np.testing.assert_allclose(plain.params[0], unrolled.params[0], rtol=0, atol=T * 2.0 ** -32)
    np.testing.assert_allclose(plain.opt_state[0], unrolled.opt_state[0], rtol=0,
                               atol=T * 2.0 ** -32)
    assert rel_err(result.outer_loss, numpy_outer(LR, MOMENTUM, LOG_C, SCALE)) < 1e-9


# --- a small MLP on real digits -----------------------------------------------------------

def digits_mlp(dtype, steps, batch=32, hidden=16, seed=0):
    """(problem, params, hparams, StepBatches, validation batch) for a 64-hidden-10 tanh MLP
    on scikit-learn's digits; hparams: per-layer log L2 penalties in the inner loss."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, 1200, size=(steps, batch))
    inner_batches = km.StepBatches((tf.constant(x[index]), tf.constant(y[index])))
    outer_batch = (tf.constant(x[1200:1500]), tf.constant(y[1200:1500]))
    params = [tf.constant(rng.normal(size=(64, hidden)).astype(dtype) * 0.2),
              tf.zeros([hidden], dtype),
              tf.constant(rng.normal(size=(hidden, 10)).astype(dtype) * 0.2),
              tf.zeros([10], dtype)]

    def logits(p, x):
        return tf.matmul(tf.tanh(tf.matmul(x, p[0]) + p[1]), p[2]) + p[3]

    def xent(p, batch):
        x, y = batch
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits(p, x)))

    def inner(p, h, batch):
        penalty = tf.exp(h["log_l2"][0]) * tf.reduce_sum(p[0] ** 2) + tf.exp(
            h["log_l2"][1]) * tf.reduce_sum(p[2] ** 2)
        return xent(p, batch) + 0.5 * penalty

    def outer(p, h, batch):
        return xent(p, batch)

    def schedule(h, t, num_steps):
        return {"learning_rate": piecewise_constant(h["lr"], t, num_steps),
                "momentum": piecewise_constant(h["momentum"], t, num_steps)}

    hparams = {"log_l2": np.array([-6.0, -5.0], dtype), "lr": np.array([0.5, 0.3], dtype),
               "momentum": np.array([0.9, 0.8], dtype)}
    return (km.BilevelProblem(inner, outer, inner_optimizer_hparams=schedule), params, hparams,
            inner_batches, outer_batch)


def test_mlp_hypergradient_equals_unrolled_float64():
    steps = 40
    problem, params, hparams, inner, outer = digits_mlp(np.float64, steps)
    est = km.Reversible(steps)
    # gamma as the estimator uses it (floor(gamma 2^16) / 2^16), so that both run one trajectory
    hparams["momentum"] = np.floor(hparams["momentum"] * 2 ** 16) / 2 ** 16
    result = tf.function(lambda h: est(problem, params, h, inner, outer))(hparams)
    unrolled = km.Unrolled(est.optimizer, steps)(problem, params, hparams, inner, outer)
    for name in hparams:
        assert rel_err(result.hypergrad[name], unrolled.hypergrad[name]) < 1e-6, name


def test_reversal_is_bit_exact_after_1000_steps_and_buffer_matches_the_formula():
    steps = 1000
    problem, params, hparams, inner, _ = digits_mlp(np.float32, steps)
    velocity = [tf.constant(np.random.default_rng(1).normal(size=p.shape).astype(np.float32)
                            * 1e-2) for p in params]
    est = km.Reversible(steps)
    check = tf.function(lambda h, v: est.reversal_check(problem, params, h, inner,
                                                        opt_state=v))(hparams, velocity)
    assert bool(check.exact)
    assert float(check.params_max_error) == 0.0 and float(check.velocity_max_error) == 0.0
    # The run moved: w_T differs from w_0.
    assert float(tf.reduce_max(tf.abs(check.params[0] - params[0]))) > 1e-2
    num_weights = sum(int(np.prod(p.shape)) for p in params)
    n = np.floor(np.array([0.9, 0.8]) * 2 ** 16)
    per_step = [16 - math.log2(n[(t * 2) // steps]) for t in range(steps)]
    expected = num_weights * sum(per_step)
    np.testing.assert_allclose(float(check.expected_bits), expected, rtol=1e-9)
    # The buffer, read as one integer per weight, holds the destroyed bits (its first digits
    # may be small: a few bits per weight below the formula at most).
    assert expected - 3 * num_weights <= float(check.buffer_bits) <= expected + num_weights
    # Packed: full 32-bit words on the stack, two to a 64-bit entry, besides the 64-bit live
    # word, so the buffer's bytes per weight stay within one spare 64-bit entry of
    # (destroyed bits + 64) / 8. An odd count leaves the last entry half full.
    assert int(check.spills) >= 1 and int(check.spills) % 2 == 1
    assert int(check.buffer_bytes) == 8 + 8 * ((int(check.spills) + 1) // 2)
    assert int(check.buffer_bytes) <= (sum(per_step) + 64 + 64) / 8


def test_reversal_exact_in_eager_mode_with_zero_start_velocity():
    problem, params, hparams, inner, _ = digits_mlp(np.float32, 30)
    check = km.Reversible(30).reversal_check(problem, params, hparams, inner)
    assert bool(check.exact)


def test_reversal_exact_in_eager_mode_through_several_spills():
    # gamma 0.05 destroys log2(2^16 / 3276) = 4.3 bits per step: 30 steps fill the 46-bit live
    # word and spill 3 words (two stack entries, the second half full), all undone eagerly.
    problem, params, hparams, inner, _ = digits_mlp(np.float32, 30)
    hparams["momentum"] = np.array([0.05, 0.05], np.float32)
    check = km.Reversible(30).reversal_check(problem, params, hparams, inner)
    assert int(check.spills) == 3
    assert int(check.buffer_bytes) == 8 + 2 * 8
    assert bool(check.exact)


# --- errors --------------------------------------------------------------------------------

def test_refuses_what_it_cannot_do():
    problem = quadratic_problem()
    hparams = {"lr": LR, "momentum": MOMENTUM, "log_c": LOG_C}
    batches = km.StepBatches(tf.constant(BVEC))
    with pytest.raises(ValueError, match="one replica"):
        km.Reversible(T, gradient_reduction=lambda g: g)
    bad = km.BilevelProblem(problem.inner_loss, problem.outer_loss,
                            inner_optimizer_hparams=lambda h, t, n: {"weight_decay": 0.1})
    with pytest.raises(ValueError, match="'weight_decay'"):
        km.Reversible(T)(bad, [W_RAW], hparams, batches, TARGET)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"momentum must be in \(0, 1\]"):
        km.Reversible(T, momentum=1.5)(
            km.BilevelProblem(problem.inner_loss, problem.outer_loss), [W_RAW],
            {"log_c": LOG_C}, batches, TARGET)
    with pytest.raises(ValueError, match="does not compile with XLA"):
        compiled(lambda h: km.Reversible(T)(problem, [W_RAW], h, batches, TARGET), "xla")(hparams)
    # ... and outside XLA the private check says so (it is TensorFlow's, pinned here)
    assert not tf.function(lambda: tf.constant(
        km.hypergrad.reversible._in_xla_context()))().numpy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="radix_bits=60"):
        # |w| up to ~200 against 2^(62 - 60) = 4 representable
        km.Reversible(T, radix_bits=60)(problem, [100 * W_RAW], hparams, batches, TARGET)
