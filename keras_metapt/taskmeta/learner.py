"""The base of the task-family meta-learners, and SGD adaptation to one task.

A task learner is a pure loss ``loss_fn(params, batch) -> scalar`` over a nest of parameter
tensors. Adapting to a task runs T steps of SGD on its support batch(es) from the
meta-learned initialisation phi:

    theta_0 = phi,   theta_{t+1} = theta_t - eta * grad L(theta_t; b_t),   t = 0 .. T-1

with eta one scalar or, per coordinate, a nest shaped like the parameters (ARUBA). b_t is
the support batch, or batch t of a `keras_metapt.hypergrad.StepBatches` (minibatches of a
many-shot task).

A meta-batch of M tasks is given as nests whose leaves have a leading task dimension M
(`keras_metapt.tasks.stack_episodes`); with StepBatches, their leaves are [M, T, ...].
"""

import functools

import numpy as np
import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.hypergrad.problem import StepBatches, batch_at

__all__ = ["sgd_adapt", "TaskMetaLearner"]


def sgd_adapt(loss_fn, params, support, num_steps, step_sizes):
    """(theta_T, sum_t g_t^2): T steps of SGD from ``params`` on ``support`` (a batch reused
    every step, or `StepBatches`) with ``step_sizes`` (a scalar, or a nest like ``params``),
    and the per-coordinate sum of the squared gradients taken. T gradients, O(P) memory; a
    `tf.while_loop`, differentiable."""
    params = _tree.to_tensors(params)
    leaves = tf.nest.flatten(params)
    if tf.nest.is_nested(step_sizes):
        tf.nest.assert_same_structure(step_sizes, params)
        rates = [_tree.cast_scalar(r, x.dtype) for r, x in
                 zip(tf.nest.flatten(step_sizes), leaves)]
    else:
        rates = [_tree.cast_scalar(step_sizes, x.dtype) for x in leaves]

    def step(t, theta, squares):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = loss_fn(tf.nest.pack_sequence_as(params, theta), batch_at(support, t))
        grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (t + 1, [x - r * g for x, r, g in zip(theta, rates, grads)],
                [s + tf.square(g) for s, g in zip(squares, grads)])

    _, theta, squares = tf.while_loop(
        lambda t, *_: t < num_steps, step,
        (tf.constant(0), leaves, [tf.zeros_like(x) for x in leaves]),
        maximum_iterations=int(num_steps))
    return (tf.nest.pack_sequence_as(params, theta),
            tf.nest.pack_sequence_as(params, squares))


def task_batch(batches, m):
    """Task ``m``'s batch of a meta-batch (leaves [M, ...]; StepBatches leaves [M, T, ...])."""
    if isinstance(batches, StepBatches):
        return StepBatches(tf.nest.map_structure(lambda x: x[m], batches.batches))
    return tf.nest.map_structure(lambda x: x[m], batches)


def num_tasks(batches):
    if isinstance(batches, StepBatches):
        batches = batches.batches
    sizes = {int(x.shape[0]) for x in tf.nest.flatten(batches)}
    if len(sizes) != 1:
        raise ValueError(f"a meta-batch's leaves disagree on the number of tasks (leading "
                         f"dimension): {sorted(sizes)}")
    return sizes.pop()


class TaskMetaLearner(tf.Module):
    """Meta-learns an initialisation phi (``self.initialisation``, variables) for SGD on tasks.

    Protocol of every method:
      ``meta_step(support, query) -> dict of scalar tensors`` takes one meta-update from a
        meta-batch of M tasks (query ignored by the methods that use only support sets);
      ``adapt(support, num_steps=None) -> params`` adapts phi to one task (no update of phi);
      ``step_sizes()`` the inner SGD step sizes (a scalar, or per coordinate);
      ``initial_values()`` phi as a nest of tensors; ``checkpoint_items()`` the state;
      ``keep_at_initial_value(leaves)`` excludes leaves of phi from meta-learning.

    Args (shared):
      loss_fn: ``loss_fn(params, batch) -> scalar``, pure.
      initial_params: a nest of arrays/tensors, phi's first value and structure.
      inner_steps: T, SGD steps per task (meta-training and, by default, adaptation).
      inner_learning_rate: the SGD step size.
    """

    def __init__(self, loss_fn, initial_params, *, inner_steps, inner_learning_rate, name):
        super().__init__(name=name)
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if float(inner_learning_rate) <= 0:
            raise ValueError(f"inner_learning_rate must be > 0, got {inner_learning_rate}")
        self.loss_fn = loss_fn
        self.inner_steps = int(inner_steps)
        self.inner_learning_rate = float(inner_learning_rate)
        structure = _tree.to_tensors(initial_params)
        # a partial, not the nest itself: tf.Module would wrap a dict for tracking
        self.pack = functools.partial(tf.nest.pack_sequence_as, structure)
        self.initialisation = [tf.Variable(x, name=f"phi_{i}") for i, x in
                               enumerate(tf.nest.flatten(structure))]
        self.meta_steps = tf.Variable(0, dtype=tf.int64, name="meta_steps")
        self._held = {}
        self._adapt = {}
        self._meta_update = tf.function(self._meta_step_arrays)

    def keep_at_initial_value(self, leaves):
        """Holds phi's leaves at these flat indices (e.g. [-2, -1], a zero linear head) at
        their present values: after every meta-step they are restored, so every task starts
        from them and only the other leaves are meta-learned."""
        for i in leaves:
            self._held[int(i) % len(self.initialisation)] = tf.identity(self.initialisation[i])

    def initial_values(self):
        return self.pack([tf.convert_to_tensor(v) for v in self.initialisation])

    def step_sizes(self):
        return self.inner_learning_rate

    def checkpoint_items(self):
        return {"initialisation": self.initialisation, "meta_steps": self.meta_steps}

    def adapt(self, support, num_steps=None):
        """phi adapted to one task by ``num_steps`` (default T) SGD steps on ``support``."""
        steps = self.inner_steps if num_steps is None else int(num_steps)
        if steps not in self._adapt:
            def adapt(batch, per_step):
                batch = StepBatches(batch) if per_step else batch
                return sgd_adapt(self.loss_fn, self.initial_values(), batch, steps,
                                 self.step_sizes())[0]
            self._adapt[steps] = tf.function(adapt)
        per_step = isinstance(support, StepBatches)
        return self._adapt[steps](support.batches if per_step else support, per_step)

    def meta_step(self, support, query=None, task_weights=None):
        """One meta-update from a meta-batch of M tasks; returns the method's metrics (Python
        floats). ``task_weights`` [M] (default uniform; e.g. clients' data sizes) are
        normalised to sum to one and weight the tasks' contributions."""
        m = num_tasks(support)
        if task_weights is None:
            weights = np.full([m], 1.0 / m)
        else:
            weights = np.asarray(task_weights, np.float64)
            if weights.shape != (m,) or not np.all(weights >= 0) or weights.sum() <= 0:
                raise ValueError(f"task_weights must be {m} non-negative numbers, not all "
                                 f"zero; got {task_weights!r}")
            weights = weights / weights.sum()
        per_step = isinstance(support, StepBatches)
        metrics = self._meta_update(support.batches if per_step else support, query,
                                    tf.constant(weights, tf.float64), per_step)
        for i, value in self._held.items():
            self.initialisation[i].assign(value)
        return {k: float(v) for k, v in metrics.items()}

    def _meta_step_arrays(self, support, query, weights, per_step):
        return self._meta_step(StepBatches(support) if per_step else support, query,
                               tf.unstack(weights))

    def _meta_step(self, support, query, weights):
        """The meta-update (traced): ``weights`` is a list of M scalar task weights."""
        raise NotImplementedError
