"""The conv classifier and the two non-meta-learned references (keras_metapt.taskmeta).

References: with the zero head every logit is 0, so the loss is exactly log(n_way); the
logits recomputed with NumPy from `fewshot.encoder_features`' output and the head
(features @ W + b); accuracy as a NumPy arg-max count; `FromScratch` leaves phi bit for bit
unchanged; a `MultitaskPretraining` step equals a Keras Adam step applied to separate copies
of the encoder and pre-training head with the gradient of the pooled cross-entropy, and its
task head stays zero.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.fewshot import encoder_features
from keras_metapt.taskmeta import (FromScratch, MultitaskPretraining, classification_accuracy,
                                   classification_loss, conv_classifier_logits,
                                   conv_classifier_params)


def images(n, seed=0, shape=(8, 8, 1)):
    return np.random.default_rng(seed).random((n,) + shape).astype(np.float32)


def test_params_shapes_and_zero_head_loss_is_log_n_way():
    params = conv_classifier_params(3, (8, 8, 1), width=4, blocks=2, seed=1)
    assert [p.shape for p in params] == [(3, 3, 1, 4), (4,), (4,), (3, 3, 4, 4), (4,), (4,),
                                         (2 * 2 * 4, 3), (3,)]
    loss = classification_loss(params, (images(6), np.array([0, 1, 2, 0, 1, 2])))
    assert float(loss) == pytest.approx(np.log(3), rel=1e-6)
    with pytest.raises(ValueError, match="blocks"):
        conv_classifier_params(3, (8, 8, 1), blocks=4)


def test_logits_and_accuracy_match_numpy():
    rng = np.random.default_rng(2)
    params = conv_classifier_params(4, (8, 8, 1), width=3, blocks=1, seed=2)
    params[-2] = rng.standard_normal(params[-2].shape).astype(np.float32)
    params[-1] = rng.standard_normal(4).astype(np.float32)
    x = images(10, seed=3)
    labels = rng.integers(0, 4, 10).astype(np.int32)
    features = encoder_features(params[:-2], tf.constant(x)).numpy()
    expected = features @ params[-2] + params[-1]
    np.testing.assert_allclose(conv_classifier_logits(params, x), expected, rtol=1e-5,
                               atol=1e-5)
    assert float(classification_accuracy(params, x, labels)) == pytest.approx(
        np.mean(expected.argmax(-1) == labels))


def test_from_scratch_never_moves_and_adapts_by_sgd():
    params = conv_classifier_params(2, (8, 8, 1), width=3, blocks=1, seed=4)
    learner = FromScratch(classification_loss, params, inner_steps=3, inner_learning_rate=0.1)
    support = (tf.constant(images(4, seed=5)[None]), tf.constant([[0, 0, 1, 1]]))
    assert learner.meta_step(support) == {}
    for got, want in zip(learner.initial_values(), params):
        np.testing.assert_array_equal(got, want)
    adapted = learner.adapt((support[0][0], support[1][0]))
    assert not np.allclose(adapted[-2], 0.0)  # the head learned something


def test_multitask_pretraining_step_is_a_keras_adam_step_on_pooled_original_labels():
    params = conv_classifier_params(2, (8, 8, 1), width=3, blocks=1, seed=6)
    learner = MultitaskPretraining(params, 5, optimizer=keras.optimizers.Adam(0.01))
    x = images(8, seed=7).reshape(2, 4, 8, 8, 1)
    labels = np.array([[0, 0, 3, 3], [4, 4, 1, 1]], np.int32)
    copies = [tf.Variable(p) for p in params[:-2]] + [tf.Variable(tf.zeros([params[-2].shape[0],
                                                                             5])),
                                                      tf.Variable(tf.zeros([5]))]
    reference = keras.optimizers.Adam(0.01)
    for _ in range(2):
        metrics = learner.meta_step((tf.constant(x), tf.constant(labels)))
        with tf.GradientTape() as tape:
            loss = classification_loss(copies, (x.reshape(8, 8, 8, 1), labels.reshape(-1)))
        reference.apply_gradients(zip(tape.gradient(loss, copies), copies))
    assert metrics["pretraining_loss"] == pytest.approx(float(loss), rel=1e-6)
    for got, want in zip(learner.trained, copies):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)
    phi = learner.initial_values()
    np.testing.assert_array_equal(phi[-2], 0.0)
    np.testing.assert_allclose(phi[0], copies[0].numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(phi[0], params[0])
