"""MetaPerturb's perturbation function (keras_metapt.hyper.metaperturb).

References: an independent NumPy transcription of the paper's function, with explicit loops
over channels and 3x3 windows (zero padding), in float64; the identity at noise coefficient 0;
permutation equivariance over channels (permuting x and eps permutes y); float64 central finite
differences of a loss through the function with respect to every weight of phi.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hyper import MetaPerturb, metaperturb


def conv3x3_single(x, kernel):
    """'SAME' 2-D cross-correlation of x [B, H, W] with a 3x3 kernel, zero padding."""
    b, h, w = x.shape
    padded = np.zeros((b, h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = x
    out = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


def equivariant_np(x, a, b):
    mean = x.mean(-1)
    shared = conv3x3_single(mean, b[:, :, 0, 0])
    return np.stack([conv3x3_single(x[..., c], a[:, :, 0, 0]) + shared
                     for c in range(x.shape[-1])], -1)


def metaperturb_np(phi, x, eps, coeff, channel_norm=64.0, spatial_norm=28.0):
    a1, b1, a2, b2, kernel, v = phi
    alpha = equivariant_np(np.maximum(equivariant_np(x, a1, b1), 0.0), a2, b2)
    z = np.log1p(np.exp(alpha + eps))
    n, size, _, channels = x.shape
    k = kernel.shape[-1]
    scale = np.zeros(channels)
    for c in range(channels):
        u = np.stack([np.maximum(conv3x3_single(x[..., c], kernel[:, :, 0, j]), 0.0
                                 ).mean((1, 2)) for j in range(k)], -1)     # [B, K]
        features = np.concatenate([u.mean(0), u.var(0, ddof=1),
                                   [channels / channel_norm, size / spatial_norm]])
        scale[c] = 1.0 / (1.0 + np.exp(-features @ v))
    return x * ((scale * z - 1.0) * coeff + 1.0)


def random_phi(rng, k=4, std=0.5):
    shapes = [(3, 3, 1, 1)] * 4 + [(3, 3, 1, k), (2 * k + 2,)]
    return [rng.standard_normal(s) * std for s in shapes]


def as_tf(values):
    return [tf.constant(v, tf.float64) for v in values]


@pytest.mark.parametrize("coeff", [1.0, 0.3])
def test_the_function_matches_a_numpy_transcription(coeff):
    rng = np.random.default_rng(0)
    phi = random_phi(rng)
    x = rng.standard_normal((3, 6, 6, 5))
    eps = rng.standard_normal(x.shape)
    got = metaperturb(as_tf(phi), tf.constant(x), tf.constant(eps), coeff).numpy()
    np.testing.assert_allclose(got, metaperturb_np(phi, x, eps, coeff), rtol=1e-12, atol=1e-12)


def test_zero_noise_coefficient_is_the_identity_and_the_clip_caps():
    rng = np.random.default_rng(1)
    phi, x = as_tf(random_phi(rng)), tf.constant(rng.standard_normal((2, 5, 5, 3)) * 3)
    eps = tf.constant(rng.standard_normal(x.shape))
    np.testing.assert_array_equal(metaperturb(phi, x, eps, 0.0).numpy(), x.numpy())
    clipped = metaperturb(phi, x, eps, 1.0, clip_value=0.5).numpy()
    assert clipped.max() <= 0.5
    np.testing.assert_array_equal(clipped, np.minimum(metaperturb(phi, x, eps).numpy(), 0.5))


def test_permuting_channels_permutes_the_output():
    rng = np.random.default_rng(2)
    phi = as_tf(random_phi(rng))
    x, eps = rng.standard_normal((4, 5, 5, 6)), rng.standard_normal((4, 5, 5, 6))
    order = rng.permutation(6)
    y = metaperturb(phi, tf.constant(x), tf.constant(eps)).numpy()
    y_permuted = metaperturb(phi, tf.constant(x[..., order]), tf.constant(eps[..., order])).numpy()
    np.testing.assert_allclose(y_permuted, y[..., order], rtol=1e-12, atol=1e-12)


def test_one_phi_serves_maps_of_any_channel_count_and_size():
    layer = MetaPerturb(seed=3)
    assert sum(int(np.prod(v.shape)) for v in layer.weight_variables()) == 82
    phi = layer.hparams()
    for shape in [(4, 28, 28, 8), (4, 7, 7, 64), (2, 3, 3, 1)]:
        y = layer.apply(phi, tf.ones(shape), tf.constant([1, 2]))
        assert y.shape == shape and bool(tf.reduce_all(tf.math.is_finite(y)))
    # the same seed gives the same draw
    x = tf.random.stateless_normal((4, 6, 6, 3), [5, 6])
    np.testing.assert_array_equal(layer.apply(phi, x, tf.constant([1, 2])).numpy(),
                                  layer.apply(phi, x, tf.constant([1, 2])).numpy())


def test_layer_is_registered_for_keras_saving():
    """Reference: Keras' registry by the registered name, and a config round trip."""
    import keras
    assert keras.saving.get_registered_object("keras_metapt>MetaPerturb") is MetaPerturb
    layer = MetaPerturb(statistics_dim=3, seed=4)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is MetaPerturb and again.statistics_dim == 3 and again.seed == 4


def test_initial_weights_of_different_seeds_share_no_draw():
    """Replicates over seeds start from independent draws. Reference: every initial weight
    tensor of seeds 0-3 compared with every other one of the same shape (none equal)."""
    layers = [MetaPerturb(seed=s) for s in range(4)]
    tensors = [(s, i, v.numpy()) for s, layer in enumerate(layers)
               for i, v in enumerate(layer.weight_variables())]
    for a, (s1, i1, x) in enumerate(tensors):
        for s2, i2, y in tensors[a + 1:]:
            if x.shape == y.shape:
                assert not np.allclose(x, y), (s1, i1, s2, i2)
    np.testing.assert_array_equal(MetaPerturb(seed=2).weight_variables()[0].numpy(),
                                  tensors[2 * 6][2])  # the same seed: the same draw


def test_gradients_with_respect_to_phi_match_central_differences():
    rng = np.random.default_rng(4)
    phi = random_phi(rng)
    x = tf.constant(rng.standard_normal((3, 5, 5, 4)))
    eps = tf.constant(rng.standard_normal((3, 5, 5, 4)))
    weights = tf.constant(rng.standard_normal((3, 5, 5, 4)))

    def loss(values):
        return tf.reduce_sum(weights * tf.tanh(metaperturb(values, x, eps, 0.7)))

    variables = as_tf(phi)
    with tf.GradientTape() as tape:
        tape.watch(variables)
        value = loss(variables)
    grads = [g.numpy() for g in tape.gradient(value, variables)]
    h = 1e-6
    for i, p in enumerate(phi):
        flat = p.reshape(-1)
        for j in range(0, flat.size, max(1, flat.size // 4)):
            up, down = [q.copy() for q in phi], [q.copy() for q in phi]
            up[i].reshape(-1)[j] += h
            down[i].reshape(-1)[j] -= h
            numeric = (float(loss(as_tf(up))) - float(loss(as_tf(down)))) / (2 * h)
            np.testing.assert_allclose(grads[i].reshape(-1)[j], numeric, rtol=1e-6, atol=1e-8)
