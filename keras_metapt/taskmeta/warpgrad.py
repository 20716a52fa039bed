"""WarpGrad (Flennerhag et al. 2020): warp layers between the task layers, meta-learned as a
preconditioner from points along the tasks' trajectories, with no backpropagation through
the adaptation.

The learner is ``warped_loss_fn(theta, omega, batch)``: task parameters theta (adapted per
task) and warp parameters omega (shared, fixed while a task adapts). Adaptation is SGD on
theta alone, so the warp layers, sitting in the forward pass, precondition its gradient.
A meta-step on M tasks:

1. Each task adapts for T steps from the initialisation phi,
   theta_{t+1} = theta_t - alpha grad_theta L(theta_t, omega; b_t); S points theta_{t_s}
   (evenly spaced, t_0 = 0; S = T keeps every point, as the authors' replay buffer does)
   enter the buffer, with their batches: b_{t_s} and, for the second step, the task's query
   set when one is given, else its batch b_{t_s + 1 mod T}.
2. The warp objective, point by point with theta_s held fixed (no gradient along the
   trajectory):  J_s(omega) = L(theta_s - alpha grad_theta L(theta_s, omega; b_s), omega; b'_s).
   The M * S points are shuffled (stateless, by ``seed`` and the meta-step) and taken
   ``warp_batch`` at a time; each chunk's task-weighted mean gradient is one SGD step on
   omega (``warp_learning_rate``; the authors' default: one step per point).
3. The initialisation, by one of two rules (``init_update``):
   - ``"leap"`` (default): the authors' simplified Leap step, the task-weighted sum of the
     trajectory's normalised displacements,
     phi <- phi + beta * sum_m w_m sum_t (theta_{t+1} - theta_t) / ||theta_{t+1} - theta_t||
     (``init_learning_rate`` beta; 0 keeps phi fixed; ``leap_norm=False`` drops the norm);
   - ``"first_order_maml"``: the first-order MAML meta-gradient through the warped learner,
     g = sum_m w_m grad_theta L(theta_T^m, omega; Q_m) at the omega the tasks adapted with,
     one step of ``meta_optimizer`` (default Adam(1e-3)) on phi. The paper pairs the warps
     with a MAML-learned initialisation in its few-shot experiments (Warp-MAML); this is its
     first-order form. Needs query sets; one more gradient per task.

Where this differs from the authors' code (`warp_on_same_loss`, `simplified_leap`): their
two steps at a point use two fresh batches of the task's training data (the same loss); here
the first is the batch of that inner step and the second the query set when one is given (a
held-out objective, as in the paper's few-shot experiments; without a query, the next inner
step's batch). Their Leap step sums the T - 1 segments between buffered states, this one all
T steps (the last step, theta_{T-1} -> theta_T, included). A last partial chunk is averaged
over its points, theirs over the chunk size. Task weights are an addition (uniform weights
give their rule). Not built: their learned inner step sizes and momentum (``learn_opt``),
several passes over the buffer (``epochs``), an on-disk buffer.

Cost per meta-step: M T gradients for the trajectories, and per buffered point one
gradient, its backward (a Hessian-vector product's worth) and a forward-backward at the
stepped point: ~4 gradients per point. Memory: the buffer, M S copies of theta; flat in T
at fixed S.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.hypergrad.problem import batch_at
from keras_metapt.taskmeta.learner import TaskMetaLearner, task_batch

__all__ = ["WarpGrad", "buffered_steps", "INIT_UPDATES"]

INIT_UPDATES = ("leap", "first_order_maml")  # WarpGrad's rules for the initialisation


def buffered_steps(num_steps, num_points=None):
    """The S buffered steps of a T-step trajectory: evenly spaced from 0 (all T when
    ``num_points`` is None or >= T)."""
    num_steps = int(num_steps)
    if num_points is None or int(num_points) >= num_steps:
        return list(range(num_steps))
    if int(num_points) < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    return sorted({int(round(v)) for v in np.linspace(0, num_steps - 1, int(num_points))})


class WarpGrad(TaskMetaLearner):
    """WarpGrad on the `TaskMetaLearner` protocol.

    Args:
      warped_loss_fn: ``warped_loss_fn(theta, omega, batch) -> scalar``, pure.
      initial_params: theta's initialisation phi (a nest).
      initial_warp_params: omega's first value (a nest).
      inner_steps, inner_learning_rate: T and alpha (see `TaskMetaLearner`).
      warp_learning_rate: the SGD step on omega per chunk of buffered points.
      init_learning_rate: beta of the Leap step on phi (0: phi fixed; Leap only).
      init_update: the rule for phi, one of ``INIT_UPDATES`` (module docstring).
      meta_optimizer: the Keras optimizer of the ``"first_order_maml"`` rule (default
        Adam(1e-3)); refused with ``"leap"``.
      trajectory_points: S points buffered per task (None: all T).
      warp_batch: buffered points per omega step (None: all M * S, one step).
      leap_norm: normalise each displacement in the Leap step (the authors' default).
      seed: the shuffle's seed.
    ``meta_step`` metrics: ``support_loss`` (task-weighted mean at phi on the first support
    batch), ``warp_objective`` (mean J_s over the buffered points, each at the omega of its
    chunk, before the chunk's step) and ``distance`` (task-weighted mean ||theta_T - phi||).
    ``adapt`` uses the current omega; ``warp_values()`` returns it.
    """

    def __init__(self, warped_loss_fn, initial_params, initial_warp_params, *, inner_steps=5,
                 inner_learning_rate=0.1, warp_learning_rate=0.1, init_learning_rate=0.01,
                 trajectory_points=None, warp_batch=1, leap_norm=True, seed=0,
                 init_update="leap", meta_optimizer=None, name="warpgrad"):
        super().__init__(lambda theta, batch: warped_loss_fn(theta, self.warp_values(), batch),
                         initial_params, inner_steps=inner_steps,
                         inner_learning_rate=inner_learning_rate, name=name)
        warp = _tree.to_tensors(initial_warp_params)
        self.warp = [tf.Variable(x, name=f"omega_{i}") for i, x in
                     enumerate(tf.nest.flatten(warp))]
        self._warp_structure = [warp]  # in a list: tf.Module would track a dict
        self.warped_loss_fn = warped_loss_fn
        for value, what in ((warp_learning_rate, "warp_learning_rate"),
                            (init_learning_rate, "init_learning_rate")):
            if float(value) < 0:
                raise ValueError(f"{what} must be >= 0, got {value}")
        if warp_batch is not None and int(warp_batch) < 1:
            raise ValueError(f"warp_batch must be >= 1 or None, got {warp_batch}")
        self.warp_learning_rate = float(warp_learning_rate)
        self.init_learning_rate = float(init_learning_rate)
        self.points = buffered_steps(self.inner_steps, trajectory_points)
        self.warp_batch = None if warp_batch is None else int(warp_batch)
        self.leap_norm = bool(leap_norm)
        self.seed = int(seed)
        if init_update not in INIT_UPDATES:
            raise ValueError(f"init_update must be one of {INIT_UPDATES}, got {init_update!r}")
        if init_update == "leap" and meta_optimizer is not None:
            raise ValueError("meta_optimizer is read only by init_update='first_order_maml'")
        self.init_update = init_update
        self.meta_optimizer = None
        if init_update == "first_order_maml":
            self.meta_optimizer = meta_optimizer or keras.optimizers.Adam(1e-3)
            self.meta_optimizer.build(self.initialisation)

    def warp_values(self):
        return tf.nest.pack_sequence_as(self._warp_structure[0],
                                        [tf.convert_to_tensor(v) for v in self.warp])

    def checkpoint_items(self):
        items = {**super().checkpoint_items(), "warp": self.warp}
        if self.meta_optimizer is not None:
            items["meta_optimizer"] = self.meta_optimizer
        return items

    def point_order(self, num_points):
        """The shuffle of this meta-step's buffered points (depends on seed and meta_steps)."""
        key = tf.stack([tf.constant(self.seed, tf.int64), self.meta_steps])
        return tf.argsort(tf.random.stateless_uniform([num_points], key))

    def _trajectory(self, phi, batch, omega):
        """(theta at each buffered step, theta_T, sum of the displacements for Leap)."""
        rates = [_tree.cast_scalar(self.inner_learning_rate, x.dtype) for x in phi]

        def step(t, theta, leap):
            grads = self.theta_gradient(theta, omega, batch_at(batch, t))
            moves = [-r * g for r, g in zip(rates, grads)]
            if self.leap_norm:
                length = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(d)) for d in moves])) + 1e-9
                leap = [a + d / tf.cast(length, d.dtype) for a, d in zip(leap, moves)]
            else:
                leap = [a + d for a, d in zip(leap, moves)]
            return t + 1, [x + d for x, d in zip(theta, moves)], leap

        theta, leap, buffered = list(phi), [tf.zeros_like(x) for x in phi], []
        ends = self.points[1:] + [self.inner_steps]
        for start, end in zip(self.points, ends):
            buffered.append(theta)
            _, theta, leap = tf.while_loop(lambda t, *_: t < end, step,
                                           (tf.constant(start), theta, leap),
                                           maximum_iterations=end - start)
        return buffered, theta, leap

    def warp_objective(self, theta, omega, batch, meta_batch):
        """J(omega) = L(theta - alpha grad_theta L(theta, omega; batch), omega; meta_batch)."""
        theta = [tf.stop_gradient(x) for x in theta]
        grads = self.theta_gradient(theta, omega, batch)
        stepped = [x - _tree.cast_scalar(self.inner_learning_rate, x.dtype) * g
                   for x, g in zip(theta, grads)]
        return self.warped_loss_fn(self.pack(stepped), omega, meta_batch)

    def theta_gradient(self, theta, omega, batch):
        """grad_theta L(theta, omega; batch), theta a flat list (differentiable in omega: the
        warp objective takes its gradient through it)."""
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = self.warped_loss_fn(self.pack(theta), omega, batch)
        return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _meta_step(self, support, query, weights):
        if self.init_update == "first_order_maml" and query is None:
            raise ValueError("WarpGrad(init_update='first_order_maml') needs query sets: "
                             "meta_step(support, query)")
        phi = tf.nest.flatten(self.initial_values())
        omega = self.warp_values()
        m = len(weights)
        thetas, metas, firsts, seconds, leaps = [], [], [], [], []
        init_grad = None
        support_loss, distance = 0.0, 0.0
        for i, w in enumerate(weights):
            batch = task_batch(support, i)
            buffered, theta_t, leap = self._trajectory(phi, batch, omega)
            thetas += buffered
            leaps.append(leap)
            if self.meta_optimizer is not None:
                grad = [tf.cast(w, g.dtype) * g for g in
                        self.theta_gradient([tf.stop_gradient(x) for x in theta_t], omega,
                                           task_batch(query, i))]
                init_grad = grad if init_grad is None else [a + b for a, b in
                                                            zip(init_grad, grad)]
            for t in self.points:
                firsts.append(batch_at(batch, t))
                seconds.append(task_batch(query, i) if query is not None
                               else batch_at(batch, (t + 1) % self.inner_steps))
            metas += [w * m] * len(buffered)
            share = tf.cast(w, tf.float32)
            support_loss += share * tf.cast(self.loss_fn(self.pack(phi), batch_at(batch, 0)),
                                            tf.float32)
            distance += share * tf.cast(tf.sqrt(tf.add_n(
                [tf.reduce_sum(tf.square(a - b)) for a, b in zip(theta_t, phi)])), tf.float32)

        # the buffer, stacked: leaves [N, ...] with N = M * S points
        n = len(thetas)
        stacked = [tf.stack(leaf) for leaf in zip(*thetas)]
        first = tf.nest.map_structure(lambda *x: tf.stack(x), *firsts)
        second = tf.nest.map_structure(lambda *x: tf.stack(x), *seconds)
        dtype = self.warp[0].dtype
        scale = tf.cast(tf.stack(metas), dtype)  # M w_m: 1 for uniform task weights
        chunk = n if self.warp_batch is None else min(self.warp_batch, n)
        chunks = -(-n // chunk)
        order = self.point_order(n)

        def warp_step(c, total):
            positions = c * chunk + tf.range(chunk)
            valid = positions < n
            picked = tf.gather(order, tf.minimum(positions, n - 1))
            with tf.GradientTape() as tape:
                omega_now = self.warp_values()  # read inside the tape: d/d omega
                losses = []
                for j in range(chunk):
                    k = picked[j]
                    theta = [tf.gather(leaf, k) for leaf in stacked]
                    pick = lambda x, k=k: tf.gather(x, k)  # noqa: E731
                    losses.append(tf.cast(self.warp_objective(
                        theta, omega_now, tf.nest.map_structure(pick, first),
                        tf.nest.map_structure(pick, second)), dtype))
                losses = tf.stack(losses)
                mask = tf.cast(valid, dtype)
                weight = mask * tf.gather(scale, picked)
                loss = tf.reduce_sum(weight * losses) / tf.reduce_sum(mask)
            grads = tape.gradient(loss, self.warp,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for v, g in zip(self.warp, grads):
                v.assign_sub(tf.cast(self.warp_learning_rate, v.dtype) * g)
            return c + 1, total + tf.cast(tf.reduce_sum(mask * losses), tf.float32)

        _, total = tf.while_loop(lambda c, _: c < chunks, warp_step,
                                 (tf.constant(0), tf.constant(0.0)), maximum_iterations=chunks)
        if self.meta_optimizer is not None:
            self.meta_optimizer.apply_gradients(zip(init_grad, self.initialisation))
        else:
            for j, v in enumerate(self.initialisation):
                move = tf.add_n([tf.cast(w, v.dtype) * leap[j]
                                 for w, leap in zip(weights, leaps)])
                v.assign_add(tf.cast(self.init_learning_rate, v.dtype) * move)
        self.meta_steps.assign_add(1)
        return {"support_loss": support_loss, "warp_objective": total / n,
                "distance": distance}
