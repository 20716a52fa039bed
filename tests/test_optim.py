"""keras_metapt.optim against update rules written out in NumPy (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt import optim
from tests.conftest import compiled


def numpy_sgd(p, g, v, lr, mu, wd, nesterov):
    g = g + wd * p
    if mu is None:
        return p - lr * g, v
    v = mu * v + g
    step = g + mu * v if nesterov else v
    return p - lr * step, v


def numpy_adamw(p, g, m, v, t, lr, b1, b2, eps, eps_root, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * (m_hat / (np.sqrt(v_hat + eps_root) + eps) + wd * p), m, v


def run_updates(opt, p0, grads, mode):
    """Applies opt.update for each gradient in turn, from p0, in the given mode."""
    def run(p):
        state = opt.init([p])
        params = [p]
        for g in grads:
            params, state = opt.update([tf.constant(g)], state, params)
        return params[0]

    return compiled(run, mode)(tf.constant(p0)).numpy()


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_sgd_three_steps_match_numpy_rule(momentum, nesterov, mode):
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(3, 2))
    grads = [rng.normal(size=(3, 2)) for _ in range(3)]
    opt = optim.sgd(0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01)

    got = run_updates(opt, p0, grads, mode)
    ref, v = p0, np.zeros_like(p0)
    for g in grads:
        ref, v = numpy_sgd(ref, g, v, 0.1, momentum, 0.01, nesterov)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_ema_momentum_sgd_three_steps_match_numpy_rule(mode):
    """Maclaurin et al. (2015), Algorithm 1: v <- gamma v - (1 - gamma) g; w <- w + lr v."""
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(3,))
    grads = [rng.normal(size=(3,)) for _ in range(3)]
    got = run_updates(optim.ema_momentum_sgd(0.2, momentum=0.7), p0, grads, mode)
    ref, v = p0, np.zeros(3)
    for g in grads:
        v = 0.7 * v - 0.3 * g
        ref = ref + 0.2 * v
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_adamw_three_steps_match_numpy_rule(mode):
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=(4,))
    grads = [rng.normal(size=(4,)) for _ in range(3)]
    opt = optim.adamw(learning_rate=0.01, weight_decay=0.1, eps_root=1e-8)

    got = run_updates(opt, p0, grads, mode)
    ref, m, v = p0, np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, start=1):
        ref, m, v = numpy_adamw(ref, g, m, v, t, 0.01, 0.9, 0.999, 1e-8, 1e-8, 0.1)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_learning_rate_override_matches_rule():
    # Reference: p - lr' * g with the overriding lr' = 0.5.
    opt = optim.sgd(0.1)
    p, g = tf.constant([1.0, 2.0], tf.float64), tf.constant([0.2, -0.4], tf.float64)
    new, _ = opt.update([g], opt.init([p]), [p], learning_rate=tf.constant(0.5, tf.float64))
    np.testing.assert_allclose(new[0].numpy(), [0.9, 2.2])


def test_unknown_override_is_named():
    opt = optim.sgd(0.1)
    p = tf.ones([2])
    with pytest.raises(ValueError, match="no hyperparameter 'momentum'"):
        opt.update([p], opt.init([p]), [p], momentum=0.5)


def _adam_forward_derivative(eps_root):
    """Forward-mode d theta_1 / d phi through one Adam step where the gradient is exactly zero.

    loss = phi * sum(relu(p)^2) at p < 0: grad = 2 phi relu(p) = 0 and d grad / d phi = 0, so
    the exact derivative is 0. The JVP of sqrt(v_hat + eps_root) at v_hat = 0 is
    tangent / (2 sqrt(eps_root)): finite for eps_root > 0, 0 * inf = NaN for eps_root = 0.
    """
    opt = optim.adam(learning_rate=0.1, eps_root=eps_root)
    phi = tf.constant(2.0, tf.float64)
    p = tf.constant([-1.0, -0.5], tf.float64)
    with tf.autodiff.ForwardAccumulator(phi, tf.constant(1.0, tf.float64)) as acc:
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = phi * tf.reduce_sum(tf.square(tf.nn.relu(p)))
        g = tape.gradient(loss, p)
        new, _ = opt.update([g], opt.init([p]), [p])
    return acc.jvp(new[0]).numpy()


def test_adam_second_derivatives_finite_at_zero_gradient():
    # Reference: the exact derivative is 0 (see _adam_forward_derivative).
    np.testing.assert_array_equal(_adam_forward_derivative(1e-8), [0.0, 0.0])
    # Without eps_root the same derivative is NaN: the trap eps_root exists for.
    assert np.all(np.isnan(_adam_forward_derivative(0.0)))


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.Adam(0.05),
    lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
    lambda: keras.optimizers.SGD(0.05),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
])
def test_mirror_keras_continues_the_live_optimizer(make):
    # Reference: the Keras optimizer itself, applied to the same gradients (float64). After 3
    # live Keras steps, the twin's next 2 steps from the mirrored state equal Keras' next 2.
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=(3, 2)), dtype="float64"),
                 keras.Variable(rng.normal(size=(2,)), dtype="float64")]
    grads = [[tf.constant(rng.normal(size=v.shape)) for v in variables] for _ in range(5)]
    keras_opt = make()
    keras_opt.build(variables)
    for g in grads[:3]:
        keras_opt.apply(g, variables)
    twin, state = optim.mirror_keras(keras_opt, variables)
    params = [tf.constant(v.numpy()) for v in variables]
    for g in grads[3:]:
        params, state = twin.update(g, state, params)
        keras_opt.apply(g, variables)
    for got, ref in zip(params, variables):
        # Adam: Keras' epsilon placement (and the twin's eps_root=1e-8 inside the square root)
        # move a step by O(lr * 1e-5) here; SGD matches to rounding.
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_mirror_keras_refuses_unsupported_optimizers_by_name():
    variables = [keras.Variable(np.zeros(2))]
    for opt in (keras.optimizers.RMSprop(), keras.optimizers.Adam(amsgrad=True),
                keras.optimizers.SGD(clipnorm=1.0)):
        opt.build(variables)
        with pytest.raises(ValueError, match="mirror_keras supports"):
            optim.mirror_keras(opt, variables)
