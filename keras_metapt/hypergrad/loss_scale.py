"""Dynamic loss scaling of a hypergradient computed from float16 losses.

Pair with ``BilevelProblem(..., outer_loss_scale=S)`` (S a tf.Variable or a tensor fed back)
and an estimator built with ``check_finite=False``:

    result = estimator(dataclasses.replace(problem, outer_loss_scale=scale), ...)
    scale, count = next_loss_scale(scale, result.is_finite, count)   # skip the update if not

The rule is Keras' `LossScaleOptimizer`'s (tests/hypergrad/test_loss_scale.py checks it
against that optimizer): halve S after a non-finite hypergradient, double it after
``growth_interval`` finite ones in a row; here a halving stops at ``minimum`` (and never
raises an S already below it).
"""

import tensorflow as tf

__all__ = ["next_loss_scale"]


def next_loss_scale(scale, is_finite, finite_in_a_row, growth_interval=200, minimum=1.0):
    """(next scale, next count of finite hypergradients in a row) after one call.

    scale: S of this call (float scalar); is_finite: scalar bool, ``result.is_finite``;
    finite_in_a_row: integer scalar, finite calls since the last change of S.
    Non-finite: S -> max(S / 2, minimum) (never above S), count -> 0. Finite: count + 1, and when that reaches
    ``growth_interval``, S -> 2 S and count -> 0. No gradients; O(1).
    """
    if int(growth_interval) < 1:
        raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
    scale = tf.convert_to_tensor(scale)
    finite_in_a_row = tf.convert_to_tensor(finite_in_a_row)
    in_a_row = finite_in_a_row + 1
    grow = is_finite & (in_a_row >= tf.cast(growth_interval, in_a_row.dtype))
    new_scale = tf.where(is_finite, tf.where(grow, scale * 2.0, scale),
                         tf.minimum(scale, tf.maximum(scale * 0.5,
                                                      tf.cast(minimum, scale.dtype))))
    new_count = tf.where(is_finite & ~grow, in_a_row, tf.zeros_like(in_a_row))
    return new_scale, new_count
