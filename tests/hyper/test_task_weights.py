"""TaskWeights: w = 2 sigmoid(phi) (closed form), starting at 1, gradients reach phi."""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hyper import TaskWeights


def test_starts_at_one_and_follows_two_sigmoid():
    layer = TaskWeights(4000)  # thousands of tasks: one vector
    np.testing.assert_array_equal(layer(None).numpy(), np.ones(4000))
    phi = np.linspace(-3, 3, 4000).astype(np.float32)
    layer.logits.assign(phi)
    np.testing.assert_allclose(layer(None).numpy(), 2 / (1 + np.exp(-phi)), rtol=1e-6)
    np.testing.assert_allclose(layer.task_weights(), 2 / (1 + np.exp(-phi)), rtol=1e-6)


def test_gradient_reaches_phi():
    # d/dphi sum_t c_t 2 sigmoid(phi_t) = c_t 2 s (1 - s); at phi = 0: c_t / 2.
    layer = TaskWeights(3)
    c = tf.constant([1.0, -2.0, 0.5])
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(c * layer(None))
    np.testing.assert_allclose(tape.gradient(out, layer.logits).numpy(), c.numpy() / 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_tasks"):
        TaskWeights(0)
    with pytest.raises(ValueError, match="task_names"):
        TaskWeights(3, task_names=["a"])
