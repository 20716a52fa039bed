"""Learned time and spatial warps, the fixed augmentations and TwoViews.

References: the identity (exact, at zero velocity); the definition of an order-preserving time
map (non-decreasing p, fixed ends); a positive Jacobian determinant (no folding) in 2-D; the
chain rule through the reparameterised noise checked by central differences in float64.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hyper import (LearnedSpatialWarp, LearnedTimeWarp, RandomCropFlip,
                                SignalCutoutNoise, TwoViews)


def _signals(batch=8, length=256, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 8 * np.pi, length)
    x = np.sin(t)[None, :, None] * rng.uniform(0.5, 2, size=(batch, 1, channels))
    return tf.constant(x + 0.1 * rng.normal(size=x.shape), tf.float32)


def test_time_warp_is_exactly_the_identity_at_zero_velocity():
    x = _signals()
    warp = LearnedTimeWarp(seed=0)
    warp.build(x.shape)
    np.testing.assert_array_equal(warp.transform(x, tf.zeros([8, warp.grid_size])).numpy(),
                                  x.numpy())
    np.testing.assert_array_equal(warp(x, training=False).numpy(), x.numpy())  # inference


@pytest.mark.parametrize("strength, strict", [(0.05, True), (0.15, False)])
def test_time_map_is_monotone_smooth_and_keeps_the_ends(strength, strict):
    x = _signals(batch=32, length=512)
    warp = LearnedTimeWarp(seed=0, initial_strength=strength)
    warp.build(x.shape)
    p = warp.time_map(x, tf.random.normal([32, warp.grid_size], seed=2)).numpy()
    slopes = np.diff(p, axis=1)
    assert slopes.min() > (0.0 if strict else -1e-4)  # order-preserving (round-off at most)
    assert np.abs(p - np.arange(512)).max() > 5  # it does warp
    np.testing.assert_allclose(p[:, 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(p[:, -1], 511.0, atol=1e-3)
    # smooth: the Gaussian rounds off the kinks of the linear upsampling; reference: the same
    # map with (almost) no smoothing
    rough_warp = LearnedTimeWarp(seed=0, initial_strength=strength, smoothing_sigma=1e-3)
    rough_warp.build(x.shape)
    rough_warp.set_weights(warp.get_weights())
    rough = rough_warp.time_map(x, tf.random.normal([32, warp.grid_size], seed=2)).numpy()
    kink = np.abs(np.diff(np.diff(rough, axis=1), axis=1)).max()
    assert np.abs(np.diff(slopes, axis=1)).max() < kink / 10


def test_spatial_warp_identity_and_no_folding():
    images = tf.random.normal([8, 28, 28, 1], seed=3)
    warp = LearnedSpatialWarp(seed=0, initial_strength=0.1)
    warp.build(images.shape)
    noise = tf.random.normal([8, warp.grid_size, warp.grid_size, 2], seed=4)
    rows, cols = (t.numpy() for t in warp.sampling_grid(images, noise))
    # Jacobian determinant of the pixel map by forward differences: positive everywhere.
    dr_di, dc_di = np.diff(rows, axis=1)[:, :, :-1], np.diff(cols, axis=1)[:, :, :-1]
    dr_dj, dc_dj = np.diff(rows, axis=2)[:, :-1, :], np.diff(cols, axis=2)[:, :-1, :]
    assert (dr_di * dc_dj - dr_dj * dc_di).min() > 0
    assert max(np.abs(rows - np.arange(28)[None, :, None]).max(), 0) > 0.5  # it does warp
    np.testing.assert_array_equal(warp.transform(images, tf.zeros_like(noise)).numpy(),
                                  images.numpy())


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
    layer = layer_cls(seed=0, initial_strength=0.1, dtype="float64")
    layer.build(shape)
    last = layer.magnitude_net.layers[-1].kernel  # starts at zero (every m_i = 1): move it
    last.assign(rng.normal(size=last.shape))

    def objective():
        return tf.reduce_sum(weights * layer.transform(x, noise))

    with tf.GradientTape() as tape:
        value = objective()
    grads = tape.gradient(value, layer.trainable_variables)
    assert len(grads) == len(layer.trainable_variables) >= 3
    for var, grad in zip(layer.trainable_variables, grads):
        assert grad is not None and np.abs(grad.numpy()).max() > 0, var.path
    # central differences on the strength and on one weight of the magnitude network
    for var in (layer.strength_logit, layer.magnitude_net.trainable_variables[0]):
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


def test_amplitude_is_softplus_strength_times_magnitudes_of_batch_mean_one():
    # Reference: the definitions strength = softplus(rho), m = B softmax(CNN(x)), in NumPy.
    keras.utils.set_random_seed(0)
    images = tf.random.normal([6, 12, 12, 1], seed=7)
    warp = LearnedSpatialWarp(seed=0, initial_strength=0.07)
    warp.build(images.shape)
    np.testing.assert_allclose(warp.strength.numpy(), 0.07, rtol=1e-6)
    np.testing.assert_allclose(warp.magnitude(images).numpy(), 1.0, rtol=1e-6)  # zero-init
    last = warp.magnitude_net.layers[-1].kernel
    last.assign(np.random.default_rng(1).normal(size=last.shape) * 10.0)
    warp.strength_logit.assign(-1.3)
    logits = warp.magnitude_net(images).numpy()[:, 0]
    expected = 6 * np.exp(logits) / np.exp(logits).sum() * np.log1p(np.exp(-1.3))
    np.testing.assert_allclose(warp.amplitude(images).numpy(), expected, rtol=1e-5)
    assert np.std(expected / expected.mean()) > 1e-3  # the magnitudes do differ
    np.testing.assert_allclose(warp.magnitude(images).numpy().mean(), 1.0, rtol=1e-6)
    shared = LearnedTimeWarp(per_example=False, initial_strength=0.2)
    shared.build((None, 64, 1))
    assert [v.path.split("/")[-1] for v in shared.trainable_variables] == ["strength_logit"]
    np.testing.assert_allclose(shared.amplitude(tf.zeros([3, 64, 1])).numpy(), 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="initial_strength must be > 0"):
        LearnedTimeWarp(initial_strength=0.0)


def _crop_flip_reference(image, pad, dy, dx, flip):
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    out = padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    return out[:, ::-1] if flip else out


def test_random_crop_flip_draws_offset_and_flip_per_example_independently():
    # Reference: NumPy pad + slice + flip for each of the (2 pad + 1)^2 x 2 outcomes; each
    # output must equal exactly one of them, and with 4096 examples every outcome occurs
    # (98 equally likely outcomes: a batch-wide crop or a crop tied to the flip would not).
    pad, size = 3, 8
    image = (np.arange(size * size, dtype=np.float32).reshape(size, size, 1) + 1.0)
    layer = RandomCropFlip(pad=pad, seed=4)
    out = layer(tf.constant(np.repeat(image[None], 4096, 0)), training=True).numpy()
    outcomes = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for flip in (False, True)]
    references = np.stack([_crop_flip_reference(image, pad, *o) for o in outcomes])
    matches = (out[:, None] == references[None]).all(axis=(2, 3, 4))
    np.testing.assert_array_equal(matches.sum(1), 1)
    counts = np.bincount(matches.argmax(1), minlength=len(outcomes))
    assert counts.min() > 0
    np.testing.assert_array_equal(layer(tf.constant(image[None]), training=False).numpy(),
                                  image[None])
    # distinct images with known draws: example i gets its own offset and flip
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, size, size, 2)).astype(np.float32)
    offsets = rng.integers(0, 2 * pad + 1, size=(5, 2)).astype(np.int32)
    flips = np.array([True, False, True, True, False])
    got = layer.crop_flip(tf.constant(images), tf.constant(offsets), tf.constant(flips)).numpy()
    for i in range(5):
        np.testing.assert_array_equal(got[i], _crop_flip_reference(images[i], pad, *offsets[i],
                                                                    flips[i]))


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
    views = TwoViews(RandomCropFlip(seed=1), LearnedSpatialWarp(seed=2))
    views.build(images.shape)
    out = views(images, training=True).numpy()
    assert out.shape == (8, 28, 28, 1)
    assert np.abs(out[:4] - out[4:]).max() > 0
    assert {id(v) for v in views.trainable_variables} == {
        id(v) for v in views.learned.trainable_variables}
    plain = TwoViews(RandomCropFlip(seed=1))
    plain.build(images.shape)
    assert not plain.trainable_variables


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_warps_compute_in_float32_under_a_mixed_policy(policy):
    # Reference: the same warp built under float32, same seed and noise. bfloat16 would round
    # the sample index 1023 of a 1024-sample signal to 1024 (out of range).
    x = _signals(batch=4, length=1024)
    noise = tf.random.stateless_normal([4, 7], seed=[1, 2])
    outputs = []
    for build_policy in ("float32", policy):
        keras.mixed_precision.set_global_policy(build_policy)
        try:
            keras.utils.set_random_seed(0)
            warp = LearnedTimeWarp(grid_size=7, initial_strength=0.1, seed=0)
            warp.build(x.shape)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        assert warp.compute_dtype == "float32"
        outputs.append(warp.transform(x, noise).numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])
    assert LearnedTimeWarp(dtype="float64").compute_dtype == "float64"  # explicit dtypes stay
