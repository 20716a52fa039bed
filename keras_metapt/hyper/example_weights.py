"""Per-example loss weights from a Meta-Weight-Net (Shu et al. 2019).

    v_i = sigmoid(W2 relu(W1 l_i + b1) + b2)          (a 1-H-1 MLP of example i's loss l_i)
    L_weighted = sum_i l_i v_i / sum_i v_i             (v / sum v only when sum v > 0)

The normalisation by the sum of the weights is that of the paper's released training scripts
(a later script of the same repository averages l_i v_i over the batch instead).

The network's input is the loss value with its gradient stopped (the original feeds the
detached loss), so d L_weighted / d theta = sum_i v_i d l_i / d theta / sum_i v_i: a weighted
gradient, and phi = (W1, b1, W2, b2) enters only through the weights. Cost: one 1-H-1 MLP
over the batch's losses; H = 100 in the original, 301 hyperparameters.
"""

import math

import keras
import numpy as np
import tensorflow as tf

__all__ = ["MetaWeightNet", "meta_weight_net_weights", "normalised_weighted_loss"]


def meta_weight_net_weights(hparams, losses, stop_loss_gradient=True):
    """v = sigmoid(W2 relu(W1 l + b1) + b2) for a vector of losses; ``hparams`` is
    [W1 [1, H], b1 [H], W2 [H, 1], b2 [1]]. The losses' gradient is stopped (as the original
    Meta-Weight-Net's detached input) unless ``stop_loss_gradient=False``."""
    kernel1, bias1, kernel2, bias2 = hparams
    x = tf.reshape(losses, [-1, 1])
    if stop_loss_gradient:
        x = tf.stop_gradient(x)
    hidden = tf.nn.relu(tf.matmul(x, kernel1) + bias1)
    return tf.sigmoid(tf.reshape(tf.matmul(hidden, kernel2) + bias2, [-1]))


def normalised_weighted_loss(losses, weights):
    """sum_i l_i v_i / sum_i v_i (sum_i l_i v_i where the weights sum to 0)."""
    total = tf.reduce_sum(weights)
    weights = tf.where(total > 0, weights / tf.where(total > 0, total, 1.0), weights)
    return tf.reduce_sum(losses * weights)


@keras.saving.register_keras_serializable(package="keras_metapt")
class MetaWeightNet(keras.layers.Layer):
    """The weighting network: per-example losses [n] -> weights in (0, 1) [n].

    Its weights are initialised as PyTorch's ``nn.Linear`` does (the original's), uniform on
    +-1/sqrt(fan_in): +-1 for the first layer (one input), +-1/sqrt(H) for the second, so the
    initial weights are near 0.5 and vary with the loss. Each of the four weights has its own
    draw (seeds derived from ``seed``). ``weight_variables()`` and ``hparams()`` give the
    variables and their values in the order `meta_weight_net_weights` takes.
    """

    def __init__(self, hidden=100, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        self.seed = seed
        # one independent integer seed per weight (the same seed twice would draw equal values
        # for equal shapes)
        seeds = ([None] * 4 if seed is None else
                 [int(s) for s in np.random.SeedSequence(seed).generate_state(4) >> 1])
        bound = 1.0 / math.sqrt(self.hidden)
        shapes = {"kernel1": ((1, self.hidden), 1.0), "bias1": ((self.hidden,), 1.0),
                  "kernel2": ((self.hidden, 1), bound), "bias2": ((1,), bound)}
        for (name, (shape, limit)), draw_seed in zip(shapes.items(), seeds):
            setattr(self, name, self.add_weight(
                shape=shape, name=name,
                initializer=keras.initializers.RandomUniform(-limit, limit, seed=draw_seed)))
        self.built = True

    def weight_variables(self):
        return [self.kernel1, self.bias1, self.kernel2, self.bias2]

    def hparams(self):
        return [tf.convert_to_tensor(v) for v in self.weight_variables()]

    def call(self, losses):
        return meta_weight_net_weights(self.hparams(), losses)

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden, seed=self.seed)
        return config
