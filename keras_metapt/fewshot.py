"""Metric-based few-shot classification (prototypical networks, Snell et al. 2017) with
feature-wise transformation layers that are fixed or meta-learned for unseen domains (Tseng
et al. 2020), the meta-learning by any hypergradient estimator (EvoGrad, as Bohdal et al.
2021, or the second-order one-step look-ahead of the original).

The encoder is a pure function of (params, images): ``blocks`` times conv 3x3 -> batch
normalisation -> [feature-wise transformation] -> ReLU -> 2x2 max-pool, then flattened
(28x28 inputs and 4 blocks give ``width`` features). Batch normalisation always uses the
statistics of the episode it is applied to (support and query together, as in the
transductive setting of MAML and of the original's episodic training); there are no running
statistics. An episode's logits are minus the squared Euclidean distances of the query
features to the class prototypes (means of the support features).

`PrototypicalTrainer.train_step(episode, pseudo_unseen)`, with meta-learned transformations:
  1. hypergradient of the pseudo-unseen episode's loss (transformations off) with respect to
     phi, the transformations' scales, through the encoder's dependence on phi: the inner
     loss is the pseudo-seen episode's loss with the transformations on (noise drawn from the
     step's seed, the same in every evaluation of the step);
  2. an optimizer step on phi;
  3. the encoder's Adam step on the pseudo-seen episode with the transformations on.
Cost per step: the estimator's (EvoGrad: K forwards + 1 backward; one-step: about 3
gradients) plus one gradient.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_metapt.hyper.feature_transform import FeatureWiseTransforms
from keras_metapt.hypergrad.problem import BilevelProblem
from keras_metapt.reweighting import per_example_cross_entropy

__all__ = ["ConvEncoder", "encoder_features", "prototype_logits", "episode_loss",
           "PrototypicalTrainer"]

BN_EPSILON = 1e-5


def batch_normalised_conv(h, kernel, gamma, beta, stride=1):
    """'SAME' convolution (``kernel``'s size, ``stride``), then normalisation by the statistics
    of this batch."""
    h = tf.nn.conv2d(h, kernel, stride, "SAME")
    # not tf.nn.moments: it stops the gradient of the mean inside the variance, which leaves
    # first derivatives exact but second derivatives (the one-step look-ahead's) wrong
    mean = tf.reduce_mean(h, axis=[0, 1, 2])
    variance = tf.reduce_mean(tf.square(h - mean), axis=[0, 1, 2])
    return (h - mean) * tf.math.rsqrt(variance + BN_EPSILON) * gamma + beta


def encoder_features(params, images, transforms=None, noise_seed=None):
    """Features [n, d] of ``images`` [n, h, w, c]; ``params`` = [kernel, bn_gamma, bn_beta] per
    block; ``transforms`` (phi of `FeatureWiseTransforms`, one layer per block) applied with
    ``noise_seed`` when given."""
    blocks = len(params) // 3
    seeds = (tf.random.experimental.stateless_split(noise_seed, blocks)
             if transforms is not None else None)
    h = images
    for b in range(blocks):
        h = batch_normalised_conv(h, *params[3 * b:3 * b + 3])
        if transforms is not None:
            h = FeatureWiseTransforms.apply(b, h, transforms, seeds[b])
        h = tf.nn.max_pool2d(tf.nn.relu(h), 2, 2, "VALID")
    return tf.reshape(h, [tf.shape(h)[0], -1])


def prototype_logits(support_features, query_features, n_way):
    """-||q - c_i||^2 for every query q and class prototype c_i (the mean of the class's rows
    of the class-major support)."""
    prototypes = tf.reduce_mean(tf.reshape(support_features, [n_way, -1,
                                                              support_features.shape[-1]]), 1)
    return -(tf.reduce_sum(query_features ** 2, -1, keepdims=True)
             - 2.0 * tf.matmul(query_features, prototypes, transpose_b=True)
             + tf.reduce_sum(prototypes ** 2, -1)[None, :])


def episode_logits(params, episode, n_way, transforms=None, noise_seed=None):
    """Query logits [n_way * n_query, n_way] of ``episode`` = (support, query, ...): support
    and query go through the encoder together (one set of normalisation statistics)."""
    support, query = episode[0], episode[1]
    features = encoder_features(params, tf.concat([support, query], 0), transforms, noise_seed)
    n_support = support.shape[0]
    return prototype_logits(features[:n_support], features[n_support:], n_way)


def episode_loss(params, episode, n_way, transforms=None, noise_seed=None):
    """Mean cross-entropy of the query predictions of ``episode`` = (support, query,
    query_labels)."""
    logits = episode_logits(params, episode, n_way, transforms, noise_seed)
    return tf.reduce_mean(per_example_cross_entropy(logits, episode[2]))


class ConvEncoder(tf.Module):
    """The encoder's variables: per block a 3x3 kernel (He-normal: std sqrt(2 / (9 c_in)))
    and the normalisation's scale (1) and offset (0); ``values()`` gives them as tensors in the
    order `encoder_features` takes. The kernels are drawn from ``seed``."""

    def __init__(self, width=32, blocks=4, in_channels=1, seed=0, name="conv_encoder"):
        super().__init__(name=name)
        if min(int(width), int(blocks), int(in_channels)) < 1:
            raise ValueError(f"width, blocks and in_channels must be >= 1, got {width}, "
                             f"{blocks}, {in_channels}")
        self.width, self.blocks = int(width), int(blocks)
        rng = np.random.default_rng([104, int(seed)])
        variables, c_in = [], int(in_channels)
        for b in range(self.blocks):
            std = math.sqrt(2.0 / (9 * c_in))
            kernel = (rng.standard_normal((3, 3, c_in, self.width)) * std).astype(np.float32)
            variables += [tf.Variable(kernel, name=f"kernel_{b}"),
                          tf.Variable(tf.ones([self.width]), name=f"bn_gamma_{b}"),
                          tf.Variable(tf.zeros([self.width]), name=f"bn_beta_{b}")]
            c_in = self.width
        self.weight_list = variables

    def values(self):
        return [tf.convert_to_tensor(v) for v in self.weight_list]

    def channels(self):
        """The channel count after each block's normalisation (for `FeatureWiseTransforms`)."""
        return [self.width] * self.blocks


class PrototypicalTrainer:
    """Episodic Adam training of a `ConvEncoder` for prototypical networks, with optional
    feature-wise transformations: fixed (``transforms`` alone) or meta-learned (with
    ``transform_optimizer`` and ``estimator``; see the module docstring).

    Args:
      encoder: a `ConvEncoder`.
      n_way: classes of a training (pseudo-seen) episode; ``pseudo_unseen_n_way`` those of a
        pseudo-unseen episode (default the same).
      learning_rate: Adam's rate for the encoder.
      transforms: a `keras_metapt.hyper.FeatureWiseTransforms` with one layer per block.
      transform_optimizer, estimator: a Keras optimizer for phi and a hypergradient estimator.
      seed: the noise of step s (transformations, EvoGrad) is drawn from the seed (seed, s).
      jit_compile: compile the steps with XLA.
    ``checkpoint_items()`` names the state to checkpoint.
    """

    def __init__(self, encoder, *, n_way, pseudo_unseen_n_way=None, learning_rate=1e-3,
                 transforms=None, transform_optimizer=None, estimator=None, seed=0,
                 jit_compile=False):
        if (transform_optimizer is None) != (estimator is None):
            raise ValueError("give transform_optimizer and estimator together, or neither")
        if estimator is not None and transforms is None:
            raise ValueError("meta-learning needs the transforms to learn")
        if transforms is not None and len(transforms.channels) != encoder.blocks:
            raise ValueError(f"transforms has {len(transforms.channels)} layers, the encoder "
                             f"{encoder.blocks} blocks")
        self.encoder, self.transforms = encoder, transforms
        self.n_way = int(n_way)
        self.pseudo_unseen_n_way = int(pseudo_unseen_n_way or n_way)
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(encoder.weight_list)
        self.transform_optimizer, self.estimator = transform_optimizer, estimator
        if estimator is not None:
            transform_optimizer.build(transforms.weight_variables())
        self.seed = int(seed)
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile)
        self._accuracies = tf.function(self._episode_accuracies, jit_compile=jit_compile)

    @property
    def meta_learned(self):
        return self.estimator is not None

    def checkpoint_items(self):
        items = {"encoder": self.encoder, "optimizer": self.optimizer, "step": self.step}
        if self.transforms is not None:
            items["transforms"] = self.transforms
        if self.meta_learned:
            items["transform_optimizer"] = self.transform_optimizer
        return items

    def problem(self):
        """Inner: the pseudo-seen episode's loss with the transformations (its batch carries
        the noise seed as a fourth entry); outer: the pseudo-unseen episode's loss without."""
        def inner_loss(params, phi, batch):
            return episode_loss(params, batch[:3], self.n_way, phi, batch[3])

        def outer_loss(params, phi, batch):
            del phi
            return episode_loss(params, batch, self.pseudo_unseen_n_way)

        rate = self.optimizer.learning_rate
        return BilevelProblem(inner_loss, outer_loss,
                              inner_optimizer_hparams=lambda h, s, n: {"learning_rate": rate},
                              inner_learning_rate=rate)

    def _train_step(self, episode, pseudo_unseen=None):
        """(training loss, pseudo-unseen loss before the step; 0 unless meta-learned)."""
        step_seed = tf.stack([tf.constant(self.seed, tf.int64), self.step.read_value()])
        noise_seed, estimator_seed = tf.unstack(
            tf.random.experimental.stateless_split(step_seed, 2))
        outer = tf.constant(0.0)
        if self.meta_learned:
            if pseudo_unseen is None:
                raise ValueError("a meta-learned step needs a pseudo-unseen episode")
            result = self.estimator(self.problem(), self.encoder.values(),
                                    self.transforms.hparams(), tuple(episode) + (noise_seed,),
                                    tuple(pseudo_unseen), seed=estimator_seed)
            self.transform_optimizer.apply_gradients(zip(result.hypergrad,
                                                         self.transforms.weight_variables()))
            outer = result.outer_loss
        phi = self.transforms.hparams() if self.transforms is not None else None
        params = self.encoder.values()
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = episode_loss(params, episode, self.n_way, phi, noise_seed)
        grads = tape.gradient(loss, params)
        self.optimizer.apply_gradients(zip(grads, self.encoder.weight_list))
        self.step.assign_add(1)
        return loss, outer

    def _episode_accuracies(self, support, query, labels, n_way):
        logits = episode_logits(self.encoder.values(), (support, query), n_way)
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        return tf.reduce_mean(hits)

    def episode_accuracy(self, episode, n_way):
        """Query accuracy of one episode (transformations off)."""
        return float(self._accuracies(tf.constant(episode.support), tf.constant(episode.query),
                                      tf.constant(episode.query_labels), n_way))
