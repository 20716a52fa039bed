"""Feature-wise transformation layers (Tseng et al. 2020, "Cross-domain few-shot classification
via learned feature-wise transformation").

After a batch normalisation with C channels, during training only:

    gamma_c = 1 + n_c * softplus(theta_gamma_c),   beta_c = m_c * softplus(theta_beta_c),
    y[..., c] = gamma_c * x[..., c] + beta_c,      n, m ~ N(0, I_C)

one draw of (n, m) per layer and call, shared by every example and position (the original
draws a [1, C, 1, 1] tensor). The hyperparameters phi are theta_gamma and theta_beta of every
layer (2 C per layer), initialised at 0.3 and 0.5 as the original (noise scales
softplus(0.3) = 0.85 and softplus(0.5) = 0.97). The noise is stateless: the same seed gives the
same draw, so a loss that applies the layers is a pure function of (params, phi, batch) when
the batch carries the seed. Cost: 2 C normal draws and one multiply-add per activation.
"""

import keras
import tensorflow as tf

__all__ = ["feature_wise_transform", "FeatureWiseTransforms"]


def feature_wise_transform(x, gamma_scale, beta_scale, seed):
    """gamma * x + beta over the last axis of ``x`` (see the module docstring); ``seed`` is a
    shape-[2] integer tensor (stateless normal draws)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    channels = tf.shape(gamma_scale)
    # drawn in float32 and cast: one seed gives the same noise in every dtype
    noise = [tf.cast(tf.random.stateless_normal(channels, s, dtype=tf.float32), x.dtype)
             for s in (seeds[0], seeds[1])]
    gamma = 1.0 + noise[0] * tf.nn.softplus(gamma_scale)
    beta = noise[1] * tf.nn.softplus(beta_scale)
    return x * gamma + beta


@keras.saving.register_keras_serializable(package="keras_metapt")
class FeatureWiseTransforms(keras.layers.Layer):
    """The weights of a stack of feature-wise transformation layers, one per entry of
    ``channels`` (the channel counts of the normalisations they follow).

    ``hparams()`` gives [theta_gamma_1, theta_beta_1, theta_gamma_2, ...] as tensors (the phi
    of a bilevel problem), ``weight_variables()`` the variables in that order, and
    ``noise_scales()`` the standard deviations softplus(theta) per layer as NumPy arrays.
    ``apply(i, x, hparams, seed)`` transforms the activations ``x`` of layer ``i``.
    """

    def __init__(self, channels, gamma_init=0.3, beta_init=0.5, **kwargs):
        super().__init__(**kwargs)
        self.channels = [int(c) for c in channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive counts, got "
                             f"{channels}")
        self.gamma_init, self.beta_init = float(gamma_init), float(beta_init)
        self._weights_list = []
        for i, c in enumerate(self.channels):
            for name, value in (("gamma", self.gamma_init), ("beta", self.beta_init)):
                self._weights_list.append(self.add_weight(
                    shape=(c,), name=f"{name}_scale_{i}",
                    initializer=keras.initializers.Constant(value)))
        self.built = True

    def weight_variables(self):
        return list(self._weights_list)

    def hparams(self):
        return [tf.convert_to_tensor(v) for v in self._weights_list]

    def noise_scales(self):
        """{"gamma": [per layer softplus(theta_gamma)], "beta": [...]} as NumPy arrays."""
        values = [tf.nn.softplus(v).numpy() for v in self._weights_list]
        return {"gamma": values[0::2], "beta": values[1::2]}

    @staticmethod
    def apply(index, x, hparams, seed):
        """Layer ``index``'s transform of ``x`` with phi = ``hparams`` (as from `hparams`)."""
        return feature_wise_transform(x, hparams[2 * index], hparams[2 * index + 1], seed)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, gamma_init=self.gamma_init,
                      beta_init=self.beta_init)
        return config
