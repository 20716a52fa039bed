"""Hyperparameter schedules shared over contiguous blocks of steps.

Micaelli & Storkey (2021) share each hyperparameter value over a block of
contiguous inner steps, so that a schedule over T steps has only B values to learn
(and forward mode costs B JVPs per step instead of T).
"""

import tensorflow as tf

__all__ = ["piecewise_constant"]


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
