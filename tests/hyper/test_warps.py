"""Learned time and spatial warps, the fixed augmentations and TwoViews.

References: the identity (exact, at zero magnitude); the definition of an order-preserving time
map (non-decreasing p, fixed ends); a positive Jacobian determinant (no folding) in 2-D; the
chain rule through the reparameterised noise checked by central differences in float64.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hyper import (LearnedSpatialWarp, LearnedTimeWarp, SignalCutoutNoise, TwoViews,
                                image_crop_flip)


def _signals(batch=8, length=256, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 8 * np.pi, length)
    x = np.sin(t)[None, :, None] * rng.uniform(0.5, 2, size=(batch, 1, channels))
    return tf.constant(x + 0.1 * rng.normal(size=x.shape), tf.float32)


def test_time_warp_is_exactly_the_identity_at_zero_magnitude():
    x = _signals()
    warp = LearnedTimeWarp(seed=0)
    warp.build(x.shape)
    warp.scale.assign(0.0)
    noise = tf.random.normal([8, warp.grid_size], seed=1)
    np.testing.assert_array_equal(warp.transform(x, noise).numpy(), x.numpy())
    np.testing.assert_array_equal(warp(x, training=False).numpy(), x.numpy())  # inference


@pytest.mark.parametrize("scale, strict", [(0.05, True), (0.15, False)])
def test_time_map_is_monotone_smooth_and_keeps_the_ends(scale, strict):
    x = _signals(batch=32, length=512)
    warp = LearnedTimeWarp(seed=0, initial_scale=scale)
    warp.build(x.shape)
    p = warp.time_map(x, tf.random.normal([32, warp.grid_size], seed=2)).numpy()
    slopes = np.diff(p, axis=1)
    assert slopes.min() > (0.0 if strict else -1e-4)  # order-preserving (round-off at most)
    assert np.abs(p - np.arange(512)).max() > 5  # it does warp
    np.testing.assert_allclose(p[:, 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(p[:, -1], 511.0, atol=1e-3)
    # smooth: the Gaussian rounds off the kinks of the linear upsampling; reference: the same
    # map with (almost) no smoothing
    rough_warp = LearnedTimeWarp(seed=0, initial_scale=scale, smoothing_sigma=1e-3)
    rough_warp.build(x.shape)
    rough_warp.set_weights(warp.get_weights())
    rough = rough_warp.time_map(x, tf.random.normal([32, warp.grid_size], seed=2)).numpy()
    kink = np.abs(np.diff(np.diff(rough, axis=1), axis=1)).max()
    assert np.abs(np.diff(slopes, axis=1)).max() < kink / 10


def test_spatial_warp_identity_and_no_folding():
    images = tf.random.normal([8, 28, 28, 1], seed=3)
    warp = LearnedSpatialWarp(seed=0, initial_scale=0.1)
    warp.build(images.shape)
    noise = tf.random.normal([8, warp.grid_size, warp.grid_size, 2], seed=4)
    rows, cols = (t.numpy() for t in warp.sampling_grid(images, noise))
    # Jacobian determinant of the pixel map by forward differences: positive everywhere.
    dr_di, dc_di = np.diff(rows, axis=1)[:, :, :-1], np.diff(cols, axis=1)[:, :, :-1]
    dr_dj, dc_dj = np.diff(rows, axis=2)[:, :-1, :], np.diff(cols, axis=2)[:, :-1, :]
    assert (dr_di * dc_dj - dr_dj * dc_di).min() > 0
    assert max(np.abs(rows - np.arange(28)[None, :, None]).max(), 0) > 0.5  # it does warp
    warp.scale.assign(0.0)
    np.testing.assert_array_equal(warp.transform(images, noise).numpy(), images.numpy())


@pytest.mark.parametrize("layer_cls, shape, noise_shape", [
    (LearnedTimeWarp, (2, 64, 2), (2, 16)),
    (LearnedSpatialWarp, (2, 12, 12, 1), (2, 5, 5, 2)),
])
def test_gradients_reach_every_phi_and_match_finite_differences(layer_cls, shape, noise_shape):
    """d/dphi of sum(w * warp(x, eps)) for fixed eps, against central differences (float64)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape))
    noise = tf.constant(rng.normal(size=noise_shape))
    weights = tf.constant(rng.normal(size=shape))
    layer = layer_cls(seed=0, initial_scale=0.1, dtype="float64")
    layer.build(shape)

    def objective():
        return tf.reduce_sum(weights * layer.transform(x, noise))

    with tf.GradientTape() as tape:
        value = objective()
    grads = tape.gradient(value, layer.trainable_variables)
    assert len(grads) == len(layer.trainable_variables) >= 3
    for var, grad in zip(layer.trainable_variables, grads):
        assert grad is not None and np.abs(grad.numpy()).max() > 0, var.path
    # central differences on the scale and on one weight of the magnitude network
    for var in (layer.scale, layer.trainable_variables[1]):
        flat = var.numpy().reshape(-1)
        grad = tf.reshape(grads[[v.path for v in layer.trainable_variables].index(var.path)], [-1])
        h = 1e-6
        for i in range(min(2, flat.size)):
            plus, minus = flat.copy(), flat.copy()
            plus[i] += h
            minus[i] -= h
            var.assign(plus.reshape(var.shape))
            f_plus = float(objective())
            var.assign(minus.reshape(var.shape))
            f_minus = float(objective())
            var.assign(flat.reshape(var.shape))
            np.testing.assert_allclose(float(grad[i]), (f_plus - f_minus) / (2 * h), rtol=1e-4,
                                       atol=1e-8)


def test_signal_cutout_noise_zeroes_one_window_per_channel_and_scales_noise():
    x = tf.ones([4, 100, 3]) + tf.random.normal([4, 100, 3], stddev=0.5, seed=5)
    layer = SignalCutoutNoise(cutout_fraction=0.2, noise_std=0.0, seed=1)
    out = layer(x, training=True).numpy()
    zeros = (out == 0).sum(axis=1)
    np.testing.assert_array_equal(zeros, 20)  # exactly one 20-sample window per channel
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    noisy = SignalCutoutNoise(cutout_fraction=0.0, noise_std=1.0, seed=2)(x * 10, training=True)
    ratio = np.std(noisy.numpy() - x.numpy() * 10) / np.std(x.numpy() * 10, axis=1).mean()
    assert 0.8 < ratio < 1.2  # noise std = noise_std x the channel's std


def test_two_views_differ_and_carry_only_the_learned_weights():
    images = tf.random.normal([4, 28, 28, 1], seed=6)
    views = TwoViews(image_crop_flip(28, 28, seed=1), LearnedSpatialWarp(seed=2))
    views.build(images.shape)
    out = views(images, training=True).numpy()
    assert out.shape == (8, 28, 28, 1)
    assert np.abs(out[:4] - out[4:]).max() > 0
    assert {id(v) for v in views.trainable_variables} == {
        id(v) for v in views.learned.trainable_variables}
    plain = TwoViews(image_crop_flip(28, 28, seed=1))
    plain.build(images.shape)
    assert not plain.trainable_variables
