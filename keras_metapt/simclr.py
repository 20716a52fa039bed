"""SimCLR pre-training, plain (fixed augmentations) or with a meta-learned augmentation.

SimCLR (Chen et al. 2020): two augmented views of each example, encoder f, projection head g,
NT-Xent loss on z = g(f(view)). `SimCLR` trains with fixed augmentations; `simclr_meta_pretrainer`
builds the `MetaPretrainer` of Raghu et al.'s second experiment, where the views come from a
`hyper.TwoViews` whose learned part (a warp) is phi, meta-learned for a downstream FT head.
"""

import keras
import tensorflow as tf

from keras_metapt import distribute
from keras_metapt.losses import simclr_pt_loss
from keras_metapt.meta_pretrainer import MetaPretrainer

__all__ = ["SimCLR", "simclr_meta_pretrainer"]


class SimCLR(keras.Model):
    """Plain SimCLR: ``fit`` on a dataset of inputs (or (inputs, labels); labels unused).

    Args:
      encoder: built model, inputs -> features. projection: built model, features -> z.
      views: layer returning two views stacked on the batch axis (`hyper.TwoViews`).
      temperature: NT-Xent temperature (0.5).
    Cost per step: 2 forward/backward passes of encoder and projection on the batch.
    Under a tf.distribute strategy each replica contrasts its own shard (local negatives).
    """

    def __init__(self, encoder, projection, views, temperature=0.5, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projection = projection
        self.views = views
        self.temperature = float(temperature)
        self._loss = simclr_pt_loss(self.temperature)
        self.loss_tracker = keras.metrics.Mean(name="ntxent")

    def call(self, inputs, training=False):
        return self.encoder(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        variables = self.encoder.trainable_variables + self.projection.trainable_variables
        with tf.GradientTape() as tape:
            z = self.projection(self.encoder(self.views(x, training=True), training=True),
                                training=True)
            loss = self._loss(None, z)
            # Keras optimizers sum gradients over replicas: each gives its share of the mean
            share = loss * distribute.shard_fraction(x, loss.dtype)
            share = self.optimizer.scale_loss(share)  # mixed_float16: Keras' LossScaleOptimizer
        self.optimizer.apply(tape.gradient(share, variables), variables)
        self.loss_tracker.update_state(loss)
        return {"ntxent": self.loss_tracker.result()}


def simclr_meta_pretrainer(encoder, projection, views, ft_head, ft_loss, temperature=0.5,
                           **kwargs):
    """A `MetaPretrainer` for SimCLR with a meta-learned augmentation.

    ``views`` (`hyper.TwoViews` with a learned part) is the meta layer, applied to PT inputs
    (meta_role "inputs"); the PT head is the projection and the PT loss NT-Xent; phi is the
    learned augmentation's weights. Other arguments go to `MetaPretrainer`.
    """
    return MetaPretrainer(encoder, projection, ft_head, views,
                          pt_loss=simclr_pt_loss(temperature), ft_loss=ft_loss,
                          meta_role="inputs", **kwargs)
