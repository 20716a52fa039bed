"""Losses for pre-training and fine-tuning."""

import tensorflow as tf

__all__ = ["masked_multitask_bce"]


def masked_multitask_bce(y_true, logits, task_weights=None):
    """(1/T) sum_t w_t * mean over labelled examples of BCE(y_nt, logits_nt).

    ``y_true`` [batch, T] holds 0/1 labels and NaN for a missing label, which is masked out; a
    task with no label in the batch contributes 0. ``task_weights`` [T] default to 1. Matches
    the multitask PT loss of Raghu et al. with per-task weights, normalised by T so its scale
    does not grow with the number of tasks.
    """
    y_true = tf.convert_to_tensor(y_true, logits.dtype)
    mask = tf.logical_not(tf.math.is_nan(y_true))
    labels = tf.where(mask, y_true, tf.zeros_like(y_true))
    mask = tf.cast(mask, logits.dtype)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits) * mask
    per_task = tf.reduce_sum(bce, axis=0) / tf.maximum(tf.reduce_sum(mask, axis=0), 1.0)
    if task_weights is not None:
        per_task = tf.cast(task_weights, logits.dtype) * per_task
    return tf.reduce_mean(per_task)
