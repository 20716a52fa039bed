"""Reptile (Nichol, Achiam & Schulman 2018): move the initialisation toward adapted weights.

    phi <- phi + epsilon * (sum_m w_m theta_T^m - phi),   sum_m w_m = 1 (default 1/M)

where theta_T^m is T SGD steps on task m's support from phi. With epsilon = 1 and w_m
proportional to the clients' data sizes this is federated averaging (McMahan et al. 2017),
clients as tasks. Query sets are not used. Cost per task: T gradients; O(P) memory.
"""

import tensorflow as tf

from keras_metapt.hypergrad.problem import batch_at
from keras_metapt.taskmeta.learner import TaskMetaLearner, sgd_adapt, task_batch

__all__ = ["Reptile"]


class Reptile(TaskMetaLearner):
    """Reptile on the `TaskMetaLearner` protocol.

    Args: see `TaskMetaLearner`, and
      meta_step_size: epsilon in (0, 1].
    ``meta_step`` metrics: ``support_loss`` (task-weighted mean at phi, before adaptation, on
    the first support batch) and ``distance`` (task-weighted mean ||theta_T - phi||).
    """

    def __init__(self, loss_fn, initial_params, *, inner_steps=5, inner_learning_rate=0.01,
                 meta_step_size=0.1, name="reptile"):
        super().__init__(loss_fn, initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)
        if not 0 < float(meta_step_size) <= 1:
            raise ValueError(f"meta_step_size must be in (0, 1], got {meta_step_size}")
        self.meta_step_size = float(meta_step_size)

    def _meta_step(self, support, query, weights):
        del query
        phi = self.initial_values()
        phi_leaves = tf.nest.flatten(phi)
        thetas, squares, support_loss, distance = [], [], 0.0, 0.0
        for i, w in enumerate(weights):
            batch = task_batch(support, i)
            theta, sq = sgd_adapt(self.loss_fn, phi, batch, self.inner_steps, self.step_sizes())
            thetas.append(tf.nest.flatten(theta))
            squares.append(tf.nest.flatten(sq))
            share = tf.cast(w, tf.float32)
            support_loss += share * tf.cast(self.loss_fn(phi, batch_at(batch, 0)), tf.float32)
            gap = tf.add_n([tf.reduce_sum(tf.square(t - p))
                            for t, p in zip(thetas[-1], phi_leaves)])
            distance += share * tf.cast(tf.sqrt(gap), tf.float32)
        self.after_tasks(phi_leaves, thetas, squares)
        for j, v in enumerate(self.initialisation):
            target = tf.add_n([tf.cast(w, v.dtype) * theta[j]
                               for w, theta in zip(weights, thetas)])
            v.assign_add(self.meta_step_size * (target - phi_leaves[j]))
        self.meta_steps.assign_add(1)
        return {"support_loss": support_loss, "distance": distance}

    def after_tasks(self, phi, thetas, squares):
        """Hook before phi moves: ``phi`` (leaves), per task theta_T and sum_t g_t^2
        (leaves)."""
        del phi, thetas, squares
