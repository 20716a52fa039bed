"""The reference hypergradient problem of the timing benchmarks (benchmarks/hypergrad.py,
benchmarks/evograd_cost.py): an MLP inputs-hidden...-10 (ReLU, softmax cross-entropy) on
fixed random data (seed 0), inner loss weighted per example by sigmoid(logit)."""

import keras
import numpy as np
import tensorflow as tf

import keras_metapt as km
from keras_metapt import functional
from keras_metapt.hyper import piecewise_constant

__all__ = ["reference_problem"]


def reference_problem(hidden, batch, forward_blocks, inputs=64):
    """The MLP problem; returns (problem_for(kind), params, hparams_for(kind), inner, outer)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((inputs,))]
                             + [keras.layers.Dense(h, activation="relu") for h in hidden]
                             + [keras.layers.Dense(10)], name="reference_mlp")
    rng = np.random.default_rng(0)
    inner = (rng.normal(size=(batch, inputs)).astype(np.float32), rng.integers(0, 10, batch))
    outer = (rng.normal(size=(batch, inputs)).astype(np.float32), rng.integers(0, 10, batch))
    params, non_trainable = functional.model_state(model)

    def per_example(p, x, y):
        logits, _ = functional.stateless_apply(model, p, non_trainable, x)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    weighted = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(tf.sigmoid(h[0]) * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)))
    fixed_weights = tf.fill([batch], 0.5)
    schedule = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(fixed_weights * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)),
        inner_optimizer_hparams=lambda h, t, T: {"learning_rate": piecewise_constant(h[0], t, T)})
    weight_logits = [tf.zeros([batch])]
    learning_rates = [tf.fill([forward_blocks], 0.1)]
    return weighted, schedule, params, weight_logits, learning_rates, inner, outer
