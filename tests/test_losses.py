"""masked_multitask_bce against a NumPy reference with missing (NaN) labels."""

import numpy as np
import tensorflow as tf

from keras_metapt.losses import masked_multitask_bce


def numpy_reference(y, logits, w):
    bce = np.maximum(logits, 0) - logits * np.nan_to_num(y) + np.log1p(np.exp(-np.abs(logits)))
    mask = ~np.isnan(y)
    per_task = np.array([bce[mask[:, t], t].mean() if mask[:, t].any() else 0.0
                         for t in range(y.shape[1])])
    return np.mean(w * per_task)


def test_matches_reference_with_missing_labels_and_weights():
    rng = np.random.default_rng(0)
    y = (rng.random((16, 5)) < 0.5).astype(np.float64)
    y[rng.random((16, 5)) < 0.3] = np.nan
    y[:, 4] = np.nan  # a task with no label in the batch contributes 0
    logits = rng.normal(size=(16, 5))
    w = rng.random(5) * 2
    got = masked_multitask_bce(tf.constant(y), tf.constant(logits), tf.constant(w))
    np.testing.assert_allclose(got.numpy(), numpy_reference(y, logits, w), rtol=1e-12)


def test_gradient_is_finite_with_nan_labels():
    y = tf.constant([[np.nan, 1.0], [0.0, np.nan]])
    logits = tf.Variable(tf.zeros([2, 2]))
    with tf.GradientTape() as tape:
        loss = masked_multitask_bce(y, logits)
    grad = tape.gradient(loss, logits).numpy()
    assert np.all(np.isfinite(grad)) and grad[0, 0] == 0.0 and grad[1, 1] == 0.0
