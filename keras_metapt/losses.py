"""Losses for pre-training and fine-tuning."""

import tensorflow as tf

__all__ = ["masked_multitask_bce", "nt_xent", "simclr_pt_loss"]


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


def nt_xent(z1, z2, temperature=0.5):
    """NT-Xent (SimCLR) loss of two views z1, z2 [batch, d] of the same examples.

    With u = normalise(concat(z1, z2)) (2N rows), s_ij = u_i . u_j / temperature and p(i) the
    other view of row i:
        loss = (1/2N) sum_i [ -s_{i,p(i)} + log sum_{j != i} exp(s_ij) ].
    Cost: one 2N x 2N similarity matrix.
    """
    z = tf.concat([z1, z2], axis=0)
    u = tf.math.l2_normalize(z, axis=1)
    n2 = tf.shape(u)[0]
    n = n2 // 2
    # tf.constant, not tf.cast: casting a Python float to float64 rounds it through float32
    sim = tf.matmul(u, u, transpose_b=True) / tf.constant(temperature, u.dtype)
    # Exclude j = i from the denominator with a large negative (finite, so no NaN gradients).
    sim = sim - tf.eye(n2, dtype=u.dtype) * tf.cast(1e9, u.dtype)
    positives = tf.concat([tf.range(n, n2), tf.range(0, n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives,
                                                                         logits=sim))


def simclr_pt_loss(temperature=0.5):
    """The PT loss of a `MetaPretrainer` whose meta layer returns two views stacked on the
    batch axis (`hyper.TwoViews`): ``loss(y_true, projections, meta_out)`` = NT-Xent of the
    first and second halves of ``projections``; labels are unused."""
    def loss(y_true, projections, meta_out=None):
        del y_true, meta_out
        z1, z2 = tf.split(projections, 2, axis=0)
        return nt_xent(z1, z2, temperature)
    return loss
