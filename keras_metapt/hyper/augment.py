"""Learned data augmentation: a layer taking inputs and noise, whose weights are phi.

A learned augmentation is reparameterised: ``transform(inputs, noise)`` is differentiable in
its weights, and the noise is drawn from the layer's own `keras.random.SeedGenerator` (whose
state is a non-trainable variable, so it is checkpointed and replayed exactly). Subclasses
implement ``transform`` and, if needed, ``noise_shape``.
"""

import keras
import tensorflow as tf

__all__ = ["LearnedAugmentation", "LearnedGaussianNoise"]


class LearnedAugmentation(keras.layers.Layer):
    """Base class: ``call(x, training)`` draws noise and returns ``transform(x, noise)``.

    At inference (training=False) the input passes through unchanged.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def noise_shape(self, input_shape):
        """Shape of the standard-normal noise for inputs of ``input_shape`` (default: same)."""
        return input_shape

    def transform(self, inputs, noise):
        raise NotImplementedError

    def call(self, inputs, training=False):
        if not training:
            return inputs
        noise = keras.random.normal(self.noise_shape(tf.shape(inputs)), dtype=inputs.dtype,
                                    seed=self.seed_generator)
        return self.transform(inputs, noise)


class LearnedGaussianNoise(LearnedAugmentation):
    """x + exp(log_scale) * noise with one learned log-scale per feature (last axis)."""

    def __init__(self, initial_scale=0.1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.initial_scale = float(initial_scale)

    def build(self, input_shape):
        self.log_scale = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(tf.math.log(self.initial_scale).numpy()),
            name="log_scale")

    def transform(self, inputs, noise):
        return inputs + tf.exp(self.log_scale) * noise
