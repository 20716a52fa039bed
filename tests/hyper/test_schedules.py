"""Schedules shared over blocks, and the clipped outer step on them.

References: the block index floor(t B / T) written out; the outer step of Micaelli & Storkey
(2021) transcribed in NumPy from its description: each hypergradient component clipped to
+-max(threshold, relative |value|) / lr, NaN set to 0, PyTorch-style SGD momentum
(buf = momentum buf + g, buf starting at 0), then values clamped into [low, high].
"""

import numpy as np
import tensorflow as tf

from keras_metapt.hyper import clipped_schedule_step, piecewise_constant


def test_piecewise_constant_blocks():
    values = tf.constant([1.0, 2.0, 3.0])
    got = [float(piecewise_constant(values, t, 10)) for t in range(10)]
    assert got == [float(1 + (t * 3) // 10) for t in range(10)]


def numpy_outer_steps(x, grads, lr, mom, thresh, pct, low, high):
    buf = np.zeros_like(x)
    for g in grads:
        g = np.where(np.isnan(g), 0.0, g)
        bound = np.maximum(thresh, pct * np.abs(x)) / lr
        g = np.minimum(np.maximum(g, -bound), bound)
        buf = mom * buf + g
        x = np.minimum(np.maximum(x - lr * buf, low), high)
    return x, buf


def test_clipped_schedule_step_matches_numpy_rule():
    rng = np.random.default_rng(0)
    x0 = np.array([0.05, 0.3, 0.9, 0.0, 0.5])
    grads = [rng.normal(size=5) * s for s in (0.01, 3.0, 0.5)] + [np.array([np.nan, 1, -1, 2, 0])]
    settings = dict(lr=0.1, mom=0.1, thresh=0.02, pct=0.1, low=0.0, high=1.0)
    x, buf = tf.constant(x0), tf.zeros(5, tf.float64)
    for g in grads:
        x, buf = clipped_schedule_step(x, g, buf, learning_rate=0.1, momentum=0.1,
                                       threshold=0.02, relative=0.1, low=0.0, high=1.0)
    ref_x, ref_buf = numpy_outer_steps(x0, grads, **settings)
    np.testing.assert_allclose(x.numpy(), ref_x, rtol=1e-12)
    np.testing.assert_allclose(buf.numpy(), ref_buf, rtol=1e-12)


def test_one_step_moves_at_most_the_bound():
    x = tf.constant([0.5, 0.01])
    new, _ = clipped_schedule_step(x, tf.constant([1e6, -1e6]), tf.zeros(2), learning_rate=0.1,
                                   momentum=0.0, threshold=0.02, relative=0.1, low=0.0,
                                   high=1.0)
    np.testing.assert_allclose(new.numpy(), [0.5 - 0.05, 0.01 + 0.02], rtol=1e-6)
