"""Continual Trajectory Shifting (Shin et al. 2021): Reptile with an initialisation update
after every inner step, each task's trajectory shifted along with it.

A meta-step runs M tasks' inner trajectories side by side for T steps from phi (T = the
reset period; ``update_every`` = u):

    theta_m <- theta_m - alpha grad L_m(theta_m; b_{m,t})            for every task m
    every u steps:  Delta = -beta (phi - sum_m w_m theta_m)            (Reptile's direction)
                    phi <- phi + Delta,   theta_m <- theta_m + Delta   (the shift)

and the trajectories restart from phi at the next meta-step. The shift is the first-order
approximation d theta_t / d phi ~ I of moving the whole trajectory to the new
initialisation: exact when the inner gradients do not depend on theta (linear losses), off
by O(alpha t ||H|| ||Delta||) otherwise. Long trajectories (hundreds of steps) thus give many
initialisation updates instead of one, with no backpropagation through them. As in the
authors' code, the meta-update is plain SGD on phi - mean theta, after the inner step; their
inner optimiser has momentum 0.9 and weight decay 5e-4, this one is plain SGD (every method
here adapts by SGD).

Cost per meta-step: M * T gradients (Reptile's with T inner steps) and T / u cheap updates;
memory O(M * P), flat in T.
"""

import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.hypergrad.problem import batch_at
from keras_metapt.taskmeta.learner import TaskMetaLearner, task_batch

__all__ = ["ContinualTrajectoryShifting"]


class ContinualTrajectoryShifting(TaskMetaLearner):
    """CTS on the `TaskMetaLearner` protocol.

    Args: see `TaskMetaLearner` (``inner_steps`` = T, the steps between restarts), and
      meta_step_size: beta in (0, 1], the step of phi toward the tasks' mean after each
        update (the authors' meta learning rate, 1e-2 with T = 1000).
      update_every: u, inner steps between initialisation updates (the authors: 1).
    ``meta_step`` metrics: ``support_loss`` (task-weighted mean of the last inner step's
    losses) and ``distance`` (task-weighted mean ||theta_T - phi|| at the end).
    """

    def __init__(self, loss_fn, initial_params, *, inner_steps=100, inner_learning_rate=0.01,
                 meta_step_size=0.01, update_every=1, name="cts"):
        super().__init__(loss_fn, initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)
        if not 0 < float(meta_step_size) <= 1:
            raise ValueError(f"meta_step_size must be in (0, 1], got {meta_step_size}")
        if not 1 <= int(update_every) <= self.inner_steps:
            raise ValueError(f"update_every must be in [1, inner_steps={self.inner_steps}], "
                             f"got {update_every}")
        self.meta_step_size = float(meta_step_size)
        self.update_every = int(update_every)

    def _meta_step(self, support, query, weights):
        del query
        phi0 = tf.nest.flatten(self.initial_values())
        m = len(weights)
        batches = [task_batch(support, i) for i in range(m)]
        rates = [_tree.cast_scalar(self.inner_learning_rate, x.dtype) for x in phi0]
        betas = [_tree.cast_scalar(self.meta_step_size, x.dtype) for x in phi0]
        w = [[tf.cast(wi, x.dtype) for x in phi0] for wi in weights]

        def step(t, phi, thetas, losses):
            new_thetas, new_losses = [], []
            for i in range(m):
                with tf.GradientTape() as tape:
                    tape.watch(thetas[i])
                    loss = self.loss_fn(self.pack(thetas[i]), batch_at(batches[i], t))
                grads = tape.gradient(loss, thetas[i],
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
                new_thetas.append([x - r * g for x, r, g in zip(thetas[i], rates, grads)])
                new_losses.append(tf.cast(loss, tf.float32))

            def shifted():
                deltas = [-b * (p - tf.add_n([w[i][j] * new_thetas[i][j] for i in range(m)]))
                          for j, (p, b) in enumerate(zip(phi, betas))]
                return ([p + d for p, d in zip(phi, deltas)],
                        [[x + d for x, d in zip(theta, deltas)] for theta in new_thetas])

            update = tf.equal(tf.math.floormod(t + 1, self.update_every), 0)
            phi, new_thetas = tf.cond(update, shifted, lambda: (phi, new_thetas))
            return t + 1, phi, new_thetas, new_losses

        _, phi, thetas, losses = tf.while_loop(
            lambda t, *_: t < self.inner_steps, step,
            (tf.constant(0), phi0, [list(phi0) for _ in range(m)],
             [tf.constant(0.0)] * m),
            maximum_iterations=self.inner_steps)
        for v, p in zip(self.initialisation, phi):
            v.assign(p)
        self.meta_steps.assign_add(1)
        distance = tf.add_n([tf.cast(wi, tf.float32) * tf.cast(tf.sqrt(tf.add_n(
            [tf.reduce_sum(tf.square(x - p)) for x, p in zip(theta, phi)])), tf.float32)
            for wi, theta in zip(weights, thetas)])
        support_loss = tf.add_n([tf.cast(wi, tf.float32) * loss
                                 for wi, loss in zip(weights, losses)])
        return {"support_loss": support_loss, "distance": distance}
