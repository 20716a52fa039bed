"""MAML (Finn et al. 2017), second order or first order, as a task-family meta-learner.

Meta-objective over tasks tau with support set S and query set Q:

    min_phi  E_tau L_Q(theta_T(phi)),   theta_T(phi) = T SGD steps on L_S from theta_0 = phi.

Second order: the meta-gradient d L_Q(theta_T) / d phi = prod_t (I - alpha H_t) grad L_Q
(theta_T), taken by `keras_metapt.hypergrad.Unrolled` on the bilevel problem with inner
parameters delta (theta = phi + delta, delta_0 = 0) and hyperparameters phi: the estimator's
direct term is grad L_Q(theta_T) and its indirect term the rest. First order (FOMAML):
grad L_Q(theta_T) alone (the Jacobian d theta_T / d phi taken as the identity).

Cost per task: T gradients forward; second order about 2 more per step backward (one HVP and
one mixed product), O(T * P) memory ("reverse") or O(T * P) plus one step's activations
("mixed"); first order T + 1 gradients, O(P) memory.
"""

import keras
import tensorflow as tf

from keras_metapt import _tree, optim
from keras_metapt.hypergrad.problem import BilevelProblem
from keras_metapt.hypergrad.unrolled import Unrolled
from keras_metapt.taskmeta.learner import TaskMetaLearner, sgd_adapt, task_batch

__all__ = ["MAML"]


class MAML(TaskMetaLearner):
    """MAML / first-order MAML on the `TaskMetaLearner` protocol.

    Args: see `TaskMetaLearner`, and
      meta_optimizer: a Keras optimizer for phi (default Adam(1e-3)), applied to the mean
        meta-gradient over the meta-batch's tasks.
      first_order: FOMAML instead of second-order MAML.
      backward: `Unrolled`'s backward pass, "reverse" or "mixed" (second order only).
    ``meta_step`` metrics: ``query_loss`` (task-weighted mean after adaptation). phi moves
    along the task-weighted mean meta-gradient.
    """

    def __init__(self, loss_fn, initial_params, *, inner_steps=5, inner_learning_rate=0.01,
                 meta_optimizer=None, first_order=False, backward="reverse", name="maml"):
        super().__init__(loss_fn, initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)
        self.first_order = bool(first_order)
        self.meta_optimizer = meta_optimizer or keras.optimizers.Adam(1e-3)
        self.meta_optimizer.build(self.initialisation)
        self._estimator = Unrolled(optim.sgd(self.inner_learning_rate), self.inner_steps,
                                   backward=backward)

    def checkpoint_items(self):
        return dict(super().checkpoint_items(), meta_optimizer=self.meta_optimizer)

    def problem(self):
        """Inner: the support loss at phi + delta; outer: the query loss at phi + delta."""
        def loss_at(delta, phi, batch):
            return self.loss_fn(_tree.tree_add(phi, delta), batch)
        return BilevelProblem(loss_at, loss_at)

    def task_gradient(self, support, query):
        """(d L_Q(theta_T) / d phi, L_Q(theta_T)) for one task."""
        phi = self.initial_values()
        if self.first_order:
            theta, _ = sgd_adapt(self.loss_fn, phi, support, self.inner_steps,
                                 self.inner_learning_rate)
            theta = _tree.tree_stop_gradient(theta)
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = self.loss_fn(theta, query)
            return tape.gradient(loss, theta), loss
        result = self._estimator(self.problem(), _tree.tree_zeros_like(phi), phi, support,
                                 query)
        return result.hypergrad, result.outer_loss

    def _meta_step(self, support, query, weights):
        if query is None:
            raise ValueError("MAML needs query sets: meta_step(support, query)")
        total, loss = None, 0.0
        for i, w in enumerate(weights):
            grad, task_loss = self.task_gradient(task_batch(support, i), task_batch(query, i))
            grad = [tf.cast(w, g.dtype) * g for g in tf.nest.flatten(grad)]
            total = grad if total is None else [a + b for a, b in zip(total, grad)]
            loss += tf.cast(w, tf.float32) * tf.cast(task_loss, tf.float32)
        self.meta_optimizer.apply_gradients(zip(total, self.initialisation))
        self.meta_steps.assign_add(1)
        return {"query_loss": loss}
