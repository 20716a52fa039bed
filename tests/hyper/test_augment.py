"""Learned augmentation interface: identity at inference, reparameterised noise, seeded."""

import numpy as np
import tensorflow as tf

from keras_metapt import functional
from keras_metapt.hyper import LearnedGaussianNoise


def test_identity_at_inference_and_gradient_reaches_phi_through_noise():
    layer = LearnedGaussianNoise(initial_scale=0.5, seed=1)
    x = tf.ones([64, 3])
    layer(x)  # build
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = tf.reduce_sum(out ** 2)
    grad = tape.gradient(loss, layer.log_scale)
    # Reference: d/dlog_s sum (1 + s e)^2 = sum 2 (1 + s e) s e, with e = (out - x) / s.
    s = 0.5
    e = (out.numpy() - 1.0) / s
    np.testing.assert_allclose(grad.numpy(), (2 * (1 + s * e) * s * e).sum(0), rtol=1e-4)


def test_noise_state_is_a_variable_that_advances_and_replays():
    layer = LearnedGaussianNoise(seed=3)
    x = tf.zeros([4, 2])
    layer(x)
    trainable, state = functional.model_state(layer)
    first, new_state = functional.stateless_apply(layer, trainable, state, x, training=True)
    again, _ = functional.stateless_apply(layer, trainable, state, x, training=True)
    second, _ = functional.stateless_apply(layer, trainable, new_state, x, training=True)
    np.testing.assert_array_equal(first.numpy(), again.numpy())  # same seed state, same noise
    assert not np.allclose(first.numpy(), second.numpy())        # advanced state, new noise
