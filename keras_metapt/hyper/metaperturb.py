"""MetaPerturb (Ryu et al. 2020, "MetaPerturb: transferable regularizer for heterogeneous tasks
and architectures"): one small perturbation function, shared by every layer it follows and by
every network it is meta-trained with, that turns a feature map into multiplicative noise.

For a feature map x [B, H, W, C] (channels last):

  noise generator (channel-equivariant; the same 3x3 kernels for every channel):
    E(x; a, b) = depthwise_conv(x, a tiled over channels) + conv(mean_c x, b)   (broadcast over c)
    alpha = E(relu(E(x; a1, b1)); a2, b2),     z = softplus(alpha + eps),  eps ~ N(0, I)
  channel scale (from per-channel statistics; permutation-equivariant over channels):
    u[n, c, :] = mean over (h, w) of relu(depthwise_conv(x[..., c], k))    k: [3, 3, 1, K]
    f_c = [mean_n u[:, c], var_n u[:, c] (unbiased), C / channel_norm, H / spatial_norm]
    s_c = sigmoid(f_c . v)                                                 v: [2K + 2]
  output:
    y = x * ((s * z - 1) * noise_coeff + 1),  optionally clipped above at ``clip_value``.

phi = (a1, b1, a2, b2, k, v): 4 * 9 + 9 K + 2 K + 2 weights (82 for K = 4), independent of the
channel count and the spatial size, so one phi serves every layer of every architecture.
noise_coeff = 0 gives y = x (the annealing of the original's target training starts there).
Cost per call: 4 single-channel-kernel convolutions over the map, one with K outputs per
channel, and a C x (2K + 2) product.
"""

import keras
import numpy as np
import tensorflow as tf

__all__ = ["MetaPerturb", "metaperturb", "channel_equivariant_conv", "channel_scale"]

PHI_NAMES = ("noise_identity_1", "noise_mean_1", "noise_identity_2", "noise_mean_2",
             "statistics_kernel", "scale_weights")


def channel_equivariant_conv(x, identity_kernel, mean_kernel):
    """depthwise_conv(x, identity_kernel for every channel) + conv(channel mean, mean_kernel);
    both kernels [3, 3, 1, 1], 'SAME' padding. Permuting x's channels permutes the output's."""
    channels = x.shape[-1]
    own = tf.nn.depthwise_conv2d(x, tf.tile(identity_kernel, [1, 1, channels, 1]),
                                 [1, 1, 1, 1], "SAME")
    shared = tf.nn.conv2d(tf.reduce_mean(x, -1, keepdims=True), mean_kernel, 1, "SAME")
    return own + shared


def channel_scale(x, statistics_kernel, scale_weights, channel_norm, spatial_norm):
    """s [C] in (0, 1): a sigmoid of a linear function of each channel's batch statistics (see
    the module docstring); needs a batch of at least 2."""
    channels, size = x.shape[-1], x.shape[1]
    k = statistics_kernel.shape[-1]
    u = tf.nn.relu(tf.nn.depthwise_conv2d(x, tf.tile(statistics_kernel, [1, 1, channels, 1]),
                                          [1, 1, 1, 1], "SAME"))
    u = tf.reshape(tf.reduce_mean(u, [1, 2]), [-1, channels, k])      # [B, C, K]
    n = tf.cast(tf.shape(u)[0], u.dtype)
    mean = tf.reduce_mean(u, 0)
    variance = tf.reduce_sum(tf.square(u - mean), 0) / (n - 1.0)
    layer = tf.ones([channels, 1], x.dtype)
    features = tf.concat([mean, variance, layer * (channels / channel_norm),
                          layer * (size / spatial_norm)], -1)           # [C, 2K + 2]
    return tf.sigmoid(tf.linalg.matvec(features, scale_weights))


def metaperturb(phi, x, normal_noise, noise_coeff=1.0, channel_norm=64.0, spatial_norm=28.0,
                clip_value=None):
    """y = x * ((s * softplus(alpha + eps) - 1) * noise_coeff + 1) (module docstring), with
    ``phi`` = [a1, b1, a2, b2, k, v] and ``normal_noise`` = eps, a standard normal draw shaped
    like x (pass it explicitly: the function is then deterministic)."""
    a1, b1, a2, b2, kernel, weights = phi
    alpha = channel_equivariant_conv(tf.nn.relu(channel_equivariant_conv(x, a1, b1)), a2, b2)
    z = tf.nn.softplus(alpha + normal_noise)
    s = channel_scale(x, kernel, weights, channel_norm, spatial_norm)
    y = x * ((s * z - 1.0) * noise_coeff + 1.0)
    return y if clip_value is None else tf.minimum(y, clip_value)


def initial_weight_seed(seed, index):
    """The initializer seed of phi's weight ``index`` for layer ``seed``: a hash of
    (seed, index), so no two (seed, index) pairs share a draw (``seed + index`` would give seed
    k's weight 1 the draw of seed k + 1's weight 0)."""
    return int(np.random.SeedSequence([0x4D50, int(seed), int(index)]).generate_state(1)[0]
               & 0x7FFFFFFF)


@keras.saving.register_keras_serializable(package="keras_metapt")
class MetaPerturb(keras.layers.Layer):
    """The weights phi of one shared perturbation function (``statistics_dim`` = K), initialised
    N(0, 0.01^2) as the original. ``hparams()`` gives phi as tensors in the order `metaperturb`
    takes, ``weight_variables()`` the variables, ``apply(phi, x, seed, ...)`` perturbs ``x``
    with noise drawn statelessly from ``seed`` (shape-[2] integers)."""

    def __init__(self, statistics_dim=4, channel_norm=64.0, spatial_norm=28.0, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        if int(statistics_dim) < 1:
            raise ValueError(f"statistics_dim must be >= 1, got {statistics_dim}")
        if channel_norm <= 0 or spatial_norm <= 0:
            raise ValueError(f"channel_norm and spatial_norm must be > 0, got {channel_norm}, "
                             f"{spatial_norm}")
        self.statistics_dim, self.seed = int(statistics_dim), int(seed)
        self.channel_norm, self.spatial_norm = float(channel_norm), float(spatial_norm)
        shapes = [(3, 3, 1, 1)] * 4 + [(3, 3, 1, self.statistics_dim),
                                       (2 * self.statistics_dim + 2,)]
        self._weights_list = [
            self.add_weight(shape=shape, name=name,
                            initializer=keras.initializers.RandomNormal(
                                0.0, 0.01, seed=initial_weight_seed(self.seed, i)))
            for i, (name, shape) in enumerate(zip(PHI_NAMES, shapes))]
        self.built = True

    def weight_variables(self):
        return list(self._weights_list)

    def hparams(self):
        return [tf.convert_to_tensor(v) for v in self._weights_list]

    def apply(self, phi, x, seed, noise_coeff=1.0, clip_value=None):
        """`metaperturb` of ``x`` with eps drawn from ``seed``."""
        eps = tf.cast(tf.random.stateless_normal(tf.shape(x), seed, dtype=tf.float32), x.dtype)
        return metaperturb(phi, x, eps, noise_coeff, self.channel_norm, self.spatial_norm,
                           clip_value)

    def get_config(self):
        config = super().get_config()
        config.update(statistics_dim=self.statistics_dim, channel_norm=self.channel_norm,
                      spatial_norm=self.spatial_norm, seed=self.seed)
        return config
