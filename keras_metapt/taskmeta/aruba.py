"""ARUBA (Khodak, Balcan & Talwalkar 2019): per-coordinate step sizes learned across tasks,
on top of Reptile (or of federated averaging, clients as tasks).

State per coordinate: B (init eps^2), G (init zeta^2), eta (init eps / zeta); a task counter
t (init 1). For each task of a meta-batch, SGD from phi with the per-coordinate step sizes
eta (T steps, gradients g_1 .. g_T) gives theta_T, then

    B <- B + (theta_T - phi)^2 / 2 + eps^2 / (t + 1)^p
    G <- G + sum_s g_s^2           + zeta^2 / (t + 1)^p
    t <- t + 1

and after the meta-batch eta <- sqrt(B / G) and phi moves as in Reptile. B / G estimates
(squared distance of task optima from phi) / (squared gradient norms) per coordinate, the
ratio that minimises the regret bound of online gradient descent. As in the authors' code,
eps = learning_rate * zeta, so the first tasks use learning_rate. (Their Reptile code updates
eta after every task; this updates it once per meta-batch: the same with one task per
meta-batch, their default, and the same as their federated code, once per round.)

Cost per task: T gradients (Reptile's); state 3P.
"""

import tensorflow as tf

from keras_metapt import _tree

from keras_metapt.taskmeta.reptile import Reptile

__all__ = ["ARUBA"]


class ARUBA(Reptile):
    """Reptile whose inner SGD uses ARUBA's per-coordinate step sizes.

    Args: see `Reptile`, and
      zeta: G's initial square root and the scale of its (t + 1)^-p increments.
      power: p.
      train_with_sgd: meta-train with the constant step size ``inner_learning_rate`` (the
        state is still collected; `adapt` uses the learned eta), as the authors' option.
    With ``meta_step_size=1`` and ``task_weights`` = client data sizes this is ARUBA on
    federated averaging.
    """

    def __init__(self, loss_fn, initial_params, *, inner_steps=5, inner_learning_rate=0.01,
                 meta_step_size=0.1, zeta=1.0, power=1.0, train_with_sgd=False, name="aruba"):
        super().__init__(loss_fn, initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate,
                         meta_step_size=meta_step_size, name=name)
        if float(zeta) <= 0:
            raise ValueError(f"zeta must be > 0, got {zeta}")
        self.zeta, self.power = float(zeta), float(power)
        self.epsilon = self.inner_learning_rate * self.zeta
        self.train_with_sgd = bool(train_with_sgd)
        leaves = [tf.convert_to_tensor(v) for v in self.initialisation]

        def filled(value, name):
            return [tf.Variable(tf.fill(tf.shape(x), _tree.cast_scalar(value, x.dtype)),
                                name=f"{name}_{i}") for i, x in enumerate(leaves)]
        self.b_squared = filled(self.epsilon ** 2, "b_squared")
        self.g_squared = filled(self.zeta ** 2, "g_squared")
        self.eta = filled(self.inner_learning_rate, "eta")
        self.task_count = tf.Variable(1, dtype=tf.int64, name="task_count")
        self._training = False

    def checkpoint_items(self):
        return dict(super().checkpoint_items(), b_squared=self.b_squared,
                    g_squared=self.g_squared, eta=self.eta, task_count=self.task_count)

    def step_sizes(self):
        if self._training and self.train_with_sgd:
            return self.inner_learning_rate
        return self.pack([tf.convert_to_tensor(e) for e in self.eta])

    def _meta_step(self, support, query, weights):
        self._training = True
        try:
            return super()._meta_step(support, query, weights)
        finally:
            self._training = False

    def after_tasks(self, phi, thetas, squares):
        for theta, sq in zip(thetas, squares):
            t = tf.cast(self.task_count + 1, tf.float64)
            for j, (b, g) in enumerate(zip(self.b_squared, self.g_squared)):
                decay = tf.cast(tf.pow(t, -self.power), b.dtype)
                b.assign_add(0.5 * tf.square(theta[j] - phi[j])
                             + _tree.cast_scalar(self.epsilon ** 2, b.dtype) * decay)
                g.assign_add(sq[j] + _tree.cast_scalar(self.zeta ** 2, g.dtype) * decay)
            self.task_count.assign_add(1)
        for e, b, g in zip(self.eta, self.b_squared, self.g_squared):
            e.assign(tf.sqrt(b / g))

    def meta_step(self, support, query=None, task_weights=None):
        metrics = super().meta_step(support, query, task_weights)
        metrics["mean_step_size"] = float(tf.add_n([tf.reduce_sum(e) for e in self.eta])
                                          / sum(int(tf.size(e)) for e in self.eta))
        return metrics
