"""Per-example loss weights from a Meta-Weight-Net (Shu et al. 2019).

    v_i = sigmoid(W2 relu(W1 l_i + b1) + b2)          (a 1-H-1 MLP of example i's loss l_i)
    L_weighted = sum_i l_i v_i / sum_i v_i             (v / sum v only when sum v > 0)

The network's input is the loss value with its gradient stopped (the original feeds the
detached loss), so d L_weighted / d theta = sum_i v_i d l_i / d theta / sum_i v_i: a weighted
gradient, and phi = (W1, b1, W2, b2) enters only through the weights. Cost: one 1-H-1 MLP
over the batch's losses; H = 100 in the original, 301 hyperparameters.
"""

import math

import keras
import tensorflow as tf

__all__ = ["MetaWeightNet", "meta_weight_net_weights", "normalised_weighted_loss"]


def meta_weight_net_weights(hparams, losses):
    """v = sigmoid(W2 relu(W1 l + b1) + b2) for a vector of losses; ``hparams`` is
    [W1 [1, H], b1 [H], W2 [H, 1], b2 [1]]. The losses' gradient is stopped."""
    kernel1, bias1, kernel2, bias2 = hparams
    x = tf.stop_gradient(tf.reshape(losses, [-1, 1]))
    hidden = tf.nn.relu(tf.matmul(x, kernel1) + bias1)
    return tf.sigmoid(tf.reshape(tf.matmul(hidden, kernel2) + bias2, [-1]))


def normalised_weighted_loss(losses, weights):
    """sum_i l_i v_i / sum_i v_i (sum_i l_i v_i where the weights sum to 0, as the original)."""
    total = tf.reduce_sum(weights)
    weights = tf.where(total > 0, weights / tf.where(total > 0, total, 1.0), weights)
    return tf.reduce_sum(losses * weights)


@keras.saving.register_keras_serializable(package="keras_metapt")
class MetaWeightNet(keras.layers.Layer):
    """The weighting network: per-example losses [n] -> weights in (0, 1) [n].

    Its weights are initialised as PyTorch's ``nn.Linear`` does (the original's), uniform on
    +-1/sqrt(fan_in): +-1 for the first layer (one input), +-1/sqrt(H) for the second, so the
    initial weights are near 0.5 and vary with the loss. ``hparams()`` gives the weight values
    in the order `meta_weight_net_weights` takes.
    """

    def __init__(self, hidden=100, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        self.seed = seed
        first = keras.initializers.RandomUniform(-1.0, 1.0, seed=seed)
        bound = 1.0 / math.sqrt(self.hidden)
        second = keras.initializers.RandomUniform(
            -bound, bound, seed=None if seed is None else seed + 1)
        self.kernel1 = self.add_weight(shape=(1, self.hidden), initializer=first, name="kernel1")
        self.bias1 = self.add_weight(shape=(self.hidden,), initializer=first, name="bias1")
        self.kernel2 = self.add_weight(shape=(self.hidden, 1), initializer=second, name="kernel2")
        self.bias2 = self.add_weight(shape=(1,), initializer=second, name="bias2")
        self.built = True

    def hparams(self):
        return [tf.convert_to_tensor(v) for v in
                (self.kernel1, self.bias1, self.kernel2, self.bias2)]

    def call(self, losses):
        return meta_weight_net_weights(self.hparams(), losses)

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden, seed=self.seed)
        return config
