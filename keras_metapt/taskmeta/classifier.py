"""The task learner of the image families: a conv net with a linear head, as pure functions.

params = [kernel, bn_gamma, bn_beta] per block (`keras_metapt.fewshot.encoder_features`:
conv 3x3 -> batch normalisation over the batch given -> ReLU -> 2x2 max-pool), then the head
[W (features x n_way), b (n_way)]. Normalisation uses the statistics of the batch it is
applied to (the support set while adapting, the query set when testing: the transductive
setting of MAML's and Reptile's few-shot experiments); there are no running statistics.
The head starts at zero, so every adapted model starts from uniform predictions and the
labels' order within a task does not matter to the initialisation.

The warped variant (WarpGrad's learner) adds after every block a warp layer, a linear 3x3
convolution width -> width with its own parameters omega (not adapted per task), initialised
to the identity: at omega's first value it computes exactly the plain classifier.
"""

import math

import numpy as np
import tensorflow as tf

from keras_metapt.fewshot import batch_normalised_conv, encoder_features
from keras_metapt.reweighting import per_example_cross_entropy

__all__ = ["conv_classifier_params", "conv_classifier_logits", "classification_loss",
           "classification_accuracy", "identity_warp_params", "warped_classifier_logits",
           "warped_classification_loss"]


def conv_classifier_params(n_way, image_shape, *, width=32, blocks=4, seed=0):
    """Initial params (a list of float32 arrays) for images of ``image_shape`` (h, w, c):
    He-normal kernels drawn from ``seed``, normalisation scale 1 and offset 0, a zero head."""
    h, w, c = (int(s) for s in image_shape)
    if min(int(n_way), int(width), int(blocks)) < 1:
        raise ValueError(f"n_way, width and blocks must be >= 1, got {n_way}, {width}, {blocks}")
    if min(h, w) < 2 ** int(blocks):
        raise ValueError(f"{blocks} blocks halve {h}x{w} images {blocks} times: too small; "
                         f"use at most {int(math.log2(min(h, w)))} blocks")
    rng = np.random.default_rng([106, int(seed)])
    params, c_in = [], c
    for _ in range(int(blocks)):
        std = math.sqrt(2.0 / (9 * c_in))
        params += [(rng.standard_normal((3, 3, c_in, int(width))) * std).astype(np.float32),
                   np.ones(int(width), np.float32), np.zeros(int(width), np.float32)]
        c_in = int(width)
    features = (h >> int(blocks)) * (w >> int(blocks)) * int(width)
    return params + [np.zeros((features, int(n_way)), np.float32),
                     np.zeros(int(n_way), np.float32)]


def conv_classifier_logits(params, images):
    """[n, n_way] logits of ``images`` [n, h, w, c]."""
    features = encoder_features(list(params[:-2]), images)
    return tf.matmul(features, params[-2]) + params[-1]


def classification_loss(params, batch):
    """Mean cross-entropy of ``batch`` = (images, integer labels)."""
    images, labels = batch
    return tf.reduce_mean(per_example_cross_entropy(conv_classifier_logits(params, images),
                                                    labels))


def classification_accuracy(params, images, labels, warp_params=None):
    """Fraction of ``images`` whose arg-max logit is the label (of the warped learner when
    ``warp_params`` are given)."""
    logits = (conv_classifier_logits(params, images) if warp_params is None
              else warped_classifier_logits(params, warp_params, images))
    predicted = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32))


def identity_warp_params(width=32, blocks=4):
    """omega's first value: one identity 3x3 kernel [3, 3, width, width] per block."""
    kernel = np.zeros((3, 3, int(width), int(width)), np.float32)
    kernel[1, 1] = np.eye(int(width), dtype=np.float32)
    return [kernel.copy() for _ in range(int(blocks))]


def warped_classifier_logits(params, warp_params, images):
    """[n, n_way] logits with a warp convolution after every block (conv -> normalisation ->
    ReLU -> 2x2 max-pool -> warp)."""
    blocks = len(params[:-2]) // 3
    if len(warp_params) != blocks:
        raise ValueError(f"{len(warp_params)} warp kernels for {blocks} blocks")
    h = images
    for b in range(blocks):
        h = tf.nn.max_pool2d(tf.nn.relu(batch_normalised_conv(h, *params[3 * b:3 * b + 3])),
                             2, 2, "VALID")
        h = tf.nn.conv2d(h, warp_params[b], 1, "SAME")
    features = tf.reshape(h, [tf.shape(h)[0], -1])
    return tf.matmul(features, params[-2]) + params[-1]


def warped_classification_loss(params, warp_params, batch):
    """Mean cross-entropy of ``batch`` = (images, integer labels), warped learner."""
    images, labels = batch
    return tf.reduce_mean(per_example_cross_entropy(
        warped_classifier_logits(params, warp_params, images), labels))
