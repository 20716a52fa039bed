"""Feature-wise transformation layers (keras_metapt.hyper.feature_transform).

References: the layer's formula y = (1 + n softplus(g)) x + m softplus(b) written out in NumPy
from the normal draws (one per channel, the same for every example and position); the
moments of gamma and beta over many seeds against N(1, softplus(g)^2) and N(0, softplus(b)^2);
float64 central finite differences of a loss through the layer with respect to g and b.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hyper import FeatureWiseTransforms, feature_wise_transform


def softplus(x):
    return np.log1p(np.exp(x))


def draws(seed, channels, dtype=tf.float64):
    a, b = tf.random.experimental.stateless_split(seed, 2)
    return (tf.random.stateless_normal([channels], a).numpy().astype(np.float64),
            tf.random.stateless_normal([channels], b).numpy().astype(np.float64))


def test_the_transform_is_one_per_channel_affine_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 4, 5))
    g, b = rng.standard_normal(5), rng.standard_normal(5)
    seed = tf.constant([3, 9], tf.int64)
    n, m = draws(seed, 5)
    expected = x * (1.0 + n * softplus(g)) + m * softplus(b)
    got = feature_wise_transform(tf.constant(x), tf.constant(g), tf.constant(b), seed).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    again = feature_wise_transform(tf.constant(x), tf.constant(g), tf.constant(b), seed).numpy()
    np.testing.assert_array_equal(got, again)


def test_gamma_and_beta_follow_their_distributions_over_seeds():
    g, b = np.array([0.3, -1.0]), np.array([0.5, 2.0])
    ones = tf.ones([1, 1, 1, 2], tf.float64)
    zeros = tf.zeros([1, 1, 1, 2], tf.float64)
    gammas, betas = [], []
    for s in range(2000):
        seed = tf.constant([s, 1], tf.int64)
        beta = feature_wise_transform(zeros, tf.constant(g), tf.constant(b), seed).numpy()
        betas.append(beta.reshape(2))
        gammas.append(feature_wise_transform(ones, tf.constant(g), tf.constant(b),
                                             seed).numpy().reshape(2) - beta.reshape(2))
    gammas, betas = np.array(gammas), np.array(betas)
    # 2000 draws: standard error of a mean ~ 0.022 sigma, of a std ~ 0.016 sigma
    np.testing.assert_allclose(gammas.mean(0), 1.0, atol=0.1 * softplus(g).max())
    np.testing.assert_allclose(betas.mean(0), 0.0, atol=0.1 * softplus(b).max())
    np.testing.assert_allclose(gammas.std(0), softplus(g), rtol=0.08)
    np.testing.assert_allclose(betas.std(0), softplus(b), rtol=0.08)


def test_gradient_with_respect_to_the_scales_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, 3, 3, 4)))
    target = tf.constant(rng.standard_normal((2, 3, 3, 4)))
    seed = tf.constant([5, 5], tf.int64)

    def loss(g, b):
        return tf.reduce_sum((feature_wise_transform(x, g, b, seed) - target) ** 2)

    g, b = tf.constant(rng.standard_normal(4)), tf.constant(rng.standard_normal(4))
    with tf.GradientTape() as tape:
        tape.watch([g, b])
        value = loss(g, b)
    grads = tape.gradient(value, [g, b])
    eps = 1e-6
    for which, analytic in enumerate(grads):
        numeric = []
        for i in range(4):
            step = np.zeros(4)
            step[i] = eps
            args_plus = [g, b]
            args_minus = [g, b]
            args_plus[which] = args_plus[which] + step
            args_minus[which] = args_minus[which] - step
            numeric.append((loss(*args_plus) - loss(*args_minus)).numpy() / (2 * eps))
        np.testing.assert_allclose(analytic.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_layer_holds_two_scales_per_channel_at_the_papers_initial_values():
    layer = FeatureWiseTransforms([3, 5])
    assert [v.shape for v in layer.weight_variables()] == [(3,), (3,), (5,), (5,)]
    scales = layer.noise_scales()
    np.testing.assert_allclose(scales["gamma"][1], softplus(0.3) * np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(scales["beta"][0], softplus(0.5) * np.ones(3), rtol=1e-6)
    x = tf.ones([1, 2, 2, 5])
    seed = tf.constant([1, 2], tf.int64)
    phi = layer.hparams()
    np.testing.assert_allclose(
        FeatureWiseTransforms.apply(1, x, phi, seed).numpy(),
        feature_wise_transform(x, phi[2], phi[3], seed).numpy())
    with pytest.raises(ValueError, match="channels"):
        FeatureWiseTransforms([])
