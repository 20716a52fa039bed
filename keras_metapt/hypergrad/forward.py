"""Forward-mode hypergradients through unrolled inner steps (Micaelli & Storkey 2021).

Carries the tangents Z_t = d(theta_t, s_t) / d phi_j forward with the inner steps:

    Z_{t+1} = dU/d(theta, s) Z_t + dU/d phi_j      (one JVP of the step per phi_j)
    hypergradient_j = d L_out/d phi_j + <d L_out/d theta_T, Z_T[theta]>

so memory does not grow with the horizon T. It suits few hyperparameters shared
over many steps: a learning-rate, momentum or weight-decay schedule with one value
per block of contiguous steps (see `keras_metapt.hyper.schedules.piecewise_constant`),
set through ``BilevelProblem.inner_optimizer_hparams``.

Cost: per step, one JVP of the optimizer step (forward-over-reverse, about 2-3
gradients) per scalar hyperparameter: n_phi * T JVPs in all.
Memory: O(P * n_phi) for the tangents, constant in T (the loop runs one step at a time).

Precision: the tangent recurrence multiplies T Jacobians; with BatchNorm or long
horizons in float32 it can grow large. Run the problem in float64 when that happens
(tangents share the primal dtype).
"""

import tensorflow as tf

from keras_metapt import _tree, distribute
from keras_metapt.hypergrad import problem as _p

__all__ = ["Forward"]


_ONE_REPLICA = (
    "Forward runs on one replica: its tangents are carried through a tf.while_loop, "
    "where strategies forbid cross-replica sums. Under a tf.distribute strategy use "
    "Unrolled, Implicit, EvoGrad or PTFT with gradient_reduction="
    "keras_metapt.distribute.replica_sum")


def _is_float(x):
    return tf.as_dtype(x.dtype).is_floating


class Forward(_p.Estimator):
    """Forward-mode (real-time recurrent) hypergradient estimator.

    Args:
      optimizer: a `keras_metapt.optim.InnerOptimizer` for the inner steps.
      num_steps: T, the number of inner steps.
      max_hparams: refuse more scalar hyperparameters than this (forward mode
        costs one JVP per scalar per step; use reverse or implicit mode for many).
      gradient_reduction: must be None: the tangents are carried through a `tf.while_loop`,
        where strategies forbid cross-replica sums (refused with a ValueError).
      check_finite: see `Estimator`. ``seed`` is accepted and ignored (deterministic).
    """

    def __init__(self, optimizer, num_steps, max_hparams=4096, *, gradient_reduction=None,
                 check_finite=True):
        if gradient_reduction is not None:
            raise ValueError(_ONE_REPLICA)
        super().__init__(check_finite=check_finite)
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.optimizer = optimizer
        self.num_steps = int(num_steps)
        self.max_hparams = int(max_hparams)

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        if distribute.num_replicas() > 1:
            raise ValueError(_ONE_REPLICA)
        params, hparams = _p.prepare(params, hparams, inner_batch, self.num_steps)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        T = self.num_steps
        flat_h = tf.nest.flatten(hparams)
        sizes = [leaf.shape.num_elements() for leaf in flat_h]
        n_phi = sum(sizes)
        if n_phi > self.max_hparams:
            raise ValueError(
                f"forward mode needs one JVP per scalar hyperparameter and step; hparams have "
                f"{n_phi} scalars (> max_hparams={self.max_hparams}). Use Unrolled or Implicit.")
        state_leaves = tf.nest.flatten(opt_state)
        float_state = [i for i, x in enumerate(state_leaves) if _is_float(x)]

        # One-hot tangents for each scalar hyperparameter, leaf by leaf.
        directions = []
        for leaf_index, (leaf, size) in enumerate(zip(flat_h, sizes)):
            for k in range(size):
                tangent = [tf.zeros_like(x) for x in flat_h]
                tangent[leaf_index] = tf.reshape(tf.one_hot(k, size, dtype=leaf.dtype), leaf.shape)
                directions.append(tangent)

        def body(t, params, opt_state, z_params, z_state):
            flat_p = tf.nest.flatten(params)
            flat_s = tf.nest.flatten(opt_state)
            primals = flat_p + [flat_s[i] for i in float_state] + flat_h
            new_z_params, new_z_state = [], []
            new_params = new_state = None
            previous = []
            for j in range(n_phi):
                tangents = z_params[j] + z_state[j] + directions[j]
                # The JVP of phi_j starts after phi_{j-1}'s is done: run side by side, the
                # n_phi JVPs would hold n_phi steps' activations at once, and the peak would
                # depend on how the executor interleaved them (it rose with T: the longer
                # the run, the worse the worst interleaving). Same operations, same results.
                # (Under XLA the compiler orders the operations itself.)
                with tf.control_dependencies(previous), \
                        tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
                    step_params, step_state = _p.inner_step(
                        problem, self.optimizer, params, opt_state, hparams, inner_batch, t, T)
                if new_params is None:
                    new_params, new_state = step_params, step_state
                zero = tf.UnconnectedGradients.ZERO
                new_z_params.append(list(acc.jvp(tf.nest.flatten(step_params), zero)))
                step_flat_s = tf.nest.flatten(step_state)
                new_z_state.append(list(acc.jvp([step_flat_s[i] for i in float_state], zero)))
                previous = new_z_params[-1] + new_z_state[-1]
            return t + 1, new_params, new_state, new_z_params, new_z_state

        z_params = [[tf.zeros_like(x) for x in tf.nest.flatten(params)] for _ in range(n_phi)]
        z_state = [[tf.zeros_like(state_leaves[i]) for i in float_state] for _ in range(n_phi)]
        # parallel_iterations=1: with the default (10) the executor runs work of several steps
        # at once (tangent chain j at step t needs only theta_t and its own tangents, so the
        # chains need not keep pace), holding several steps' parameters and activations; how
        # deep the overlap gets depends on thread scheduling, and longer runs reach deeper, so
        # peak memory rose with T (reference MLP, tensors held: 35 MiB at T=10, 45 at T=1000;
        # one step at a time: 14 MiB at both). Same operations, same results.
        _, params, opt_state, z_params, _ = tf.while_loop(
            lambda t, *_: t < T, body, (tf.constant(0), params, opt_state, z_params, z_state),
            maximum_iterations=T, parallel_iterations=1)

        outer_loss, g_params, direct = _p.outer_gradients(problem, params, hparams, outer_batch)
        flat_g = tf.nest.flatten(g_params)
        columns = tf.stack([_tree.tree_vdot(flat_g, z) for z in z_params])
        parts = tf.split(columns, sizes)
        indirect = tf.nest.pack_sequence_as(
            hparams, [tf.reshape(part, leaf.shape) for part, leaf in zip(parts, flat_h)])
        indirect = self._mark_unconnected(problem, params, opt_state, hparams, inner_batch,
                                          indirect)
        return self._finish(hparams, direct, indirect, outer_loss, params, opt_state,
                            scale=problem.outer_loss_scale)

    def _mark_unconnected(self, problem, params, opt_state, hparams, inner_batch, indirect):
        """Sets the indirect term to None for leaves that cannot reach the inner step.

        A tangent recurrence yields zeros, never None, so whether a hyperparameter
        enters the inner step at all is read off a reverse-mode tape over one step
        (structural: in a graph the check costs nothing at run time; eagerly it
        costs one extra inner step).
        """
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(hparams))
            step_params, _ = _p.inner_step(problem, self.optimizer, params, opt_state, hparams,
                                           inner_batch, tf.constant(0), self.num_steps)
            total = tf.add_n([tf.reduce_sum(x) for x in tf.nest.flatten(step_params)])
        reach = tape.gradient(total, hparams)
        return tf.nest.map_structure(lambda r, i: None if r is None else i, reach, indirect)
