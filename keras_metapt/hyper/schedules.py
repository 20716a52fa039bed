"""Hyperparameter schedules shared over contiguous blocks of steps.

Micaelli & Storkey (2021) share each hyperparameter value over a block of
contiguous inner steps, so that a schedule over T steps has only B values to learn
(and forward mode costs B JVPs per step instead of T).
"""

import tensorflow as tf

__all__ = ["piecewise_constant", "clipped_schedule_step"]


def piecewise_constant(values, step, num_steps):
    """values[b] with b = floor(step * B / num_steps), B = len(values).

    Blocks are as equal as integer division allows; ``step`` may be a Python int or
    a scalar int tensor (inside a `tf.while_loop`).
    """
    values = tf.convert_to_tensor(values)
    num_blocks = values.shape[0]
    if num_blocks is None or values.shape.rank != 1:
        raise ValueError(f"values must be a 1-D tensor of known length, got shape {values.shape}")
    step = tf.cast(step, tf.int64)
    block = (step * num_blocks) // int(num_steps)
    return tf.gather(values, tf.minimum(block, num_blocks - 1))


def clipped_schedule_step(values, hypergrad, velocity, *, learning_rate, momentum, threshold,
                          relative, low, high):
    """One outer step on a schedule, as Micaelli & Storkey (2021) take it.

        g' = clip(g, +-max(threshold, relative |x|) / learning_rate)   (NaN -> 0)
        m <- momentum m + g';   x <- clip(x - learning_rate m, low, high)

    so that without momentum one step moves a value by at most max(threshold, relative |x|):
    long-horizon hypergradients are large and noisy, and the bound keeps one bad estimate from
    wrecking the schedule. ``values``, ``hypergrad`` and ``velocity`` are same-shaped tensors
    (one schedule); the rest are Python floats. Returns (new values, new velocity). O(B).
    """
    values = tf.convert_to_tensor(values)
    hypergrad = tf.convert_to_tensor(hypergrad, values.dtype)
    hypergrad = tf.where(tf.math.is_nan(hypergrad), tf.zeros_like(hypergrad), hypergrad)
    bound = tf.maximum(tf.constant(threshold, values.dtype),
                       tf.constant(relative, values.dtype) * tf.abs(values)) / learning_rate
    velocity = momentum * tf.convert_to_tensor(velocity, values.dtype) + tf.clip_by_value(
        hypergrad, -bound, bound)
    return tf.clip_by_value(values - learning_rate * velocity, low, high), velocity
