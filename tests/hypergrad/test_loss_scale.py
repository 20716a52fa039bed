"""Loss scaling of the outer loss (``BilevelProblem.outer_loss_scale``) and its dynamic rule.

References:
- the hypergradient of a separable quadratic problem computed in float16, against a float64
  NumPy transcription of the steps and their derivatives (forward recursion of dw/dphi and
  dv/dphi through v <- gamma v - (1 - gamma) (w - phi), w <- w + lr v), and for Implicit the
  closed form at the inner optimum (w* = phi, so d outer/d phi = c (phi - y));
- EvoGrad: the same draw (same stateless seed) of the same problem computed in float64;
- `next_loss_scale`: the scales Keras' own `LossScaleOptimizer` goes through for the same
  sequence of finite and non-finite gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import linalg, optim
from tests.conftest import rel_err

LR, GAMMA, STEPS = 0.3, 0.5, 6
C = 2.0 ** -26  # the outer loss's factor: c (w - y) lies below float16's smallest subnormal
W0 = np.array([1.0, -0.5, 0.25, 2.0])
PHI = np.array([0.5, 0.75, -1.0, 1.5])
Y = np.array([-0.25, 1.0, 0.5, 0.0])


def separable_problem(compute_dtype, scale=None):
    """inner 1/2 ||w - phi||^2 and outer c/2 ||w - y||^2, the squares computed in
    ``compute_dtype`` (a float16 network's activations) and the losses in float32 after it."""
    loss_dtype = tf.float64 if compute_dtype == tf.float64 else tf.float32

    def squares(a, b):
        a, b = tf.cast(a, compute_dtype), tf.cast(b, compute_dtype)
        return tf.cast(0.5 * tf.reduce_sum(tf.square(a - b)), loss_dtype)

    def inner(params, hparams, _):
        return squares(params[0], hparams[0])

    def outer(params, _, y):
        loss = squares(params[0], y)
        return loss * tf.constant(C, loss.dtype)

    return km.BilevelProblem(inner, outer, outer_loss_scale=scale)


def reference_after_steps():
    """(hypergradient, outer loss) after STEPS steps of ema-momentum SGD, float64."""
    w, v = W0.copy(), np.zeros(4)
    dw, dv = np.zeros(4), np.zeros(4)  # d w / d phi, d v / d phi (diagonal)
    for _ in range(STEPS):
        v = GAMMA * v - (1 - GAMMA) * (w - PHI)
        dv = GAMMA * dv - (1 - GAMMA) * (dw - 1.0)
        w = w + LR * v
        dw = dw + LR * dv
    return C * (w - Y) * dw, C * 0.5 * np.sum((w - Y) ** 2)


STEPPING = {
    "unrolled": lambda: km.Unrolled(optim.ema_momentum_sgd(LR, GAMMA), STEPS,
                                    check_finite=False),
    "unrolled_mixed": lambda: km.Unrolled(optim.ema_momentum_sgd(LR, GAMMA), STEPS,
                                          backward="mixed", check_finite=False),
    "forward": lambda: km.Forward(optim.ema_momentum_sgd(LR, GAMMA), STEPS, check_finite=False),
    "reversible": lambda: km.Reversible(STEPS, LR, GAMMA, check_finite=False),
}


def call(estimator, problem, w0, **kwargs):
    return estimator(problem, [tf.constant(w0, tf.float32)], [tf.constant(PHI, tf.float32)],
                     None, tf.constant(Y, tf.float32), **kwargs)


@pytest.mark.parametrize("name", sorted(STEPPING))
def test_float16_hypergradient_needs_the_scale_and_matches_float64_with_it(name):
    truth, loss = reference_after_steps()
    plain = call(STEPPING[name](), separable_problem(tf.float16), W0)
    # c (w - y) in float16 is zero: without a scale nothing of the outer gradient survives
    assert np.all(plain.hypergrad[0].numpy() == 0.0)
    scaled = tf.function(lambda: call(STEPPING[name](),
                                      separable_problem(tf.float16, 2.0 ** 20), W0))()
    assert scaled.hypergrad[0].dtype == tf.float32
    assert rel_err(scaled.hypergrad[0], truth) < 2e-3  # float16: 11-bit steps
    assert abs(float(scaled.outer_loss) - loss) < 1e-2 * loss  # reported unscaled


AT_OPTIMUM = {
    "implicit": lambda: km.Implicit(linalg.cg(5), check_finite=False),
    # H = I and a quadratic: SAMA's identity base Jacobian and its central difference are
    # exact, the radius only sets how far apart the two float16 gradients are
    "sama": lambda: km.SAMA(radius=1.0, check_finite=False),
}


@pytest.mark.parametrize("name", sorted(AT_OPTIMUM))
def test_at_the_optimum_with_scale_matches_closed_form(name):
    truth = C * (PHI - Y)  # w*(phi) = phi
    plain = call(AT_OPTIMUM[name](), separable_problem(tf.float16), PHI)
    assert np.all(plain.hypergrad[0].numpy() == 0.0)
    scaled = call(AT_OPTIMUM[name](), separable_problem(tf.float16, 2.0 ** 20), PHI)
    assert rel_err(scaled.hypergrad[0], truth) < 2e-3


def test_evograd_with_scale_matches_its_float64_draw():
    seed = tf.constant([3, 1], tf.int64)
    estimator = km.EvoGrad(num_copies=3, sigma=0.05, temperature=0.5, check_finite=False)
    scaled = call(estimator, separable_problem(tf.float16, 2.0 ** 20), W0, seed=seed)
    exact = estimator(separable_problem(tf.float64), [tf.constant(W0)], [tf.constant(PHI)],
                      None, tf.constant(Y), seed=seed)
    assert float(tf.reduce_max(tf.abs(exact.hypergrad[0]))) > 0.0
    assert rel_err(scaled.hypergrad[0], exact.hypergrad[0].numpy()) < 5e-3


def test_dynamic_scale_skips_overflows_and_settles():
    """From S = 2^60 the scaled outer gradient overflows float16 (max 65504); the loop halves
    S after every non-finite result, as `MetaPretrainer` does, and then matches float64."""
    truth, _ = reference_after_steps()
    scale = tf.Variable(2.0 ** 60)
    count = tf.Variable(0, dtype=tf.int64)
    problem = separable_problem(tf.float16, scale)
    estimator = STEPPING["unrolled"]()

    @tf.function
    def step():
        result = call(estimator, problem, W0)
        new_scale, new_count = km.hypergrad.next_loss_scale(scale, result.is_finite, count)
        scale.assign(new_scale)
        count.assign(new_count)
        return result

    finite = [bool(result.is_finite) for result in (step() for _ in range(40))]
    first = finite.index(True)
    assert first > 0 and all(finite[first:])
    assert float(scale.numpy()) == 2.0 ** (60 - first)
    assert int(count.numpy()) == 40 - first
    assert rel_err(step().hypergrad[0], truth) < 1e-2


def test_next_loss_scale_follows_keras_loss_scale_optimizer():
    pattern = [True, True, True, False, True, False, False, True, True, True, True, True, True,
               False, True]
    keras_opt = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.0), initial_scale=2.0 ** 10, dynamic_growth_steps=3)
    var = keras.Variable(np.zeros(2, np.float32))
    keras_opt.build([var])
    scale, count, ours, theirs = tf.constant(2.0 ** 10), tf.constant(0), [], []
    for finite in pattern:
        grad = tf.constant([1.0, 1.0] if finite else [np.inf, 1.0], tf.float32)
        keras_opt.apply([grad], [var])
        theirs.append(float(keras_opt.dynamic_scale.numpy()))
        scale, count = km.hypergrad.next_loss_scale(scale, tf.constant(finite), count, 3)
        ours.append(float(scale.numpy()))
    assert ours == theirs
    assert len(set(ours)) > 2  # it both grew and shrank


def test_next_loss_scale_floor_and_bad_interval():
    scale, count = km.hypergrad.next_loss_scale(1.0, tf.constant(False), 5)
    assert float(scale) == 1.0 and int(count) == 0
    # a scale already below the floor is not raised to it by an overflow
    scale, _ = km.hypergrad.next_loss_scale(0.25, tf.constant(False), 5, minimum=1.0)
    assert float(scale) == 0.25
    with pytest.raises(ValueError, match="growth_interval"):
        km.hypergrad.next_loss_scale(1.0, tf.constant(True), 0, growth_interval=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_bad_scale_is_named(bad):
    with pytest.raises(ValueError, match="outer_loss_scale"):
        separable_problem(tf.float16, bad)


def test_hyperdistill_refuses_a_scale():
    estimator = km.HyperDistill(optim.sgd(LR), gamma=0.9)
    estimator.start([tf.constant(W0, tf.float32)])
    with pytest.raises(ValueError, match="outer_loss_scale"):
        call(estimator, separable_problem(tf.float32, 2.0 ** 10), W0)



def test_float16_hparams_take_a_scale_beyond_float16s_range():
    """float16 weights and hyperparameters, float32 losses, S = 2^16 (inf in float16).
    Reference: the
    closed form at the inner optimum w* = phi of inner 1/2 ||w - phi||^2 and outer
    c/2 (||w - y||^2 + ||phi - y||^2): d outer / d phi = 2 c (phi - y), c = 2^-10, exact in
    float16. S must be divided out in float32: in float16 it would be inf and the result a
    silent 0."""
    c = 2.0 ** -10

    def inner(params, hparams, _):
        w, phi = tf.cast(params[0], tf.float32), tf.cast(hparams[0], tf.float32)
        return 0.5 * tf.reduce_sum(tf.square(w - phi))

    def outer(params, hparams, y):
        w, phi = tf.cast(params[0], tf.float32), tf.cast(hparams[0], tf.float32)
        return c * 0.5 * (tf.reduce_sum(tf.square(w - y)) + tf.reduce_sum(tf.square(phi - y)))

    problem = km.BilevelProblem(inner, outer, outer_loss_scale=2.0 ** 16)
    result = km.Implicit(linalg.cg(5), check_finite=False)(
        problem, [tf.constant(PHI, tf.float16)], [tf.constant(PHI, tf.float16)], None,
        tf.constant(Y, tf.float32))
    assert result.hypergrad[0].dtype == tf.float16
    np.testing.assert_array_equal(result.hypergrad[0].numpy(), 2 * c * (PHI - Y))


def test_float16_loss_overflowing_the_scale_is_reported_not_zero():
    """A loss returned in float16 at S = 2^16 (inf in float16): the backward starts at inf
    and the solve's right-hand side holds infinities. Reference: the flag must say
    non-finite (CG used to stop at once on an infinite residual and hand back its zero
    start, a finite 0)."""
    def outer(params, _, y):
        return tf.cast(0.5 * tf.reduce_sum(tf.square(params[0] - y)), tf.float16)

    problem = km.BilevelProblem(separable_problem(tf.float32).inner_loss, outer,
                                outer_loss_scale=2.0 ** 16)
    result = call(km.Implicit(linalg.cg(5), check_finite=False), problem, PHI)
    assert not bool(result.is_finite)
