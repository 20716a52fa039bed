"""Reverse-mode hypergradients through T unrolled inner optimizer steps.

theta_{t+1} = U(theta_t, s_t, grad_theta L_in(theta_t, phi, b_t); h_t(phi)),  t = 0..T-1
hypergradient = d L_out(theta_T, phi) / d phi, by backpropagation through the steps.

Truncation to the last K steps (Shaban et al. 2019) treats theta_{T-K} as a
constant: only the last K steps are recorded and differentiated. K = 1 is the
greedy one-step (T1-T2) hypergradient.

Cost: T inner gradients forward, plus about 2 gradients per differentiated step
backward (second-order terms: one HVP and one mixed product per step).
Memory: O(K * P) for the recorded steps (O(T * P) untruncated).
"""

import tensorflow as tf

from keras_metapt import _tree, distribute
from keras_metapt.hypergrad import problem as _p

__all__ = ["Unrolled"]


class Unrolled(_p.Estimator):
    """Reverse-mode (backprop-through-training) hypergradient estimator.

    Args:
      optimizer: a `keras_metapt.optim.InnerOptimizer` for the inner steps.
      num_steps: T, the number of inner steps.
      truncate: K, differentiate through the last K steps only (None: all T).
      gradient_reduction: None (one device) or a cross-replica sum
        (`keras_metapt.distribute.replica_sum`): inner and outer gradients are summed over
        replicas (the losses must be replica shares of the global-batch means), the steps are
        traced in Python, and the backward pass runs through the sums (their adjoint is a
        sum too), giving the single-device hypergradient of the global batches.
      check_finite: see `Estimator`. ``seed`` is accepted and ignored (deterministic).
    """

    def __init__(self, optimizer, num_steps, truncate=None, *, gradient_reduction=None,
                 check_finite=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if truncate is not None and not 1 <= int(truncate) <= int(num_steps):
            raise ValueError(f"truncate must be in [1, num_steps={num_steps}], got {truncate}")
        self.optimizer = optimizer
        self.num_steps = int(num_steps)
        self.truncate = None if truncate is None else int(truncate)

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        params, hparams = _p.prepare(params, hparams, inner_batch, self.num_steps)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        T = self.num_steps
        K = T if self.truncate is None else self.truncate
        reduce = self.gradient_reduction

        # Steps 0 .. T-K-1 are run without recording: theta_{T-K} is a constant.
        frozen = _tree.tree_stop_gradient(hparams)
        params, opt_state = _p.run_inner_steps(problem, self.optimizer, params, opt_state, frozen,
                                               inner_batch, 0, T - K, T, reduce)
        params = _tree.tree_stop_gradient(params)
        opt_state = _tree.tree_stop_gradient(opt_state)

        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(hparams))
            final_params, final_state = _p.run_inner_steps(
                problem, self.optimizer, params, opt_state, hparams, inner_batch, T - K, T, T,
                reduce)
            # d L_out / d theta_T, taken inside the tape so that the indirect term is
            # <d L_out / d theta_T, d theta_T / d phi> computed as one VJP.
            outer_loss, g_params, direct = _p.outer_gradients(problem, final_params, hparams,
                                                              outer_batch, reduce)
            g_params = _tree.tree_stop_gradient(g_params)
            surrogate = _tree.tree_vdot(g_params, final_params)
            if reduce is not None:
                # Every replica holds the same surrogate; the adjoint of each cross-replica
                # sum adds the replicas' cotangents, so each replica seeds 1/R of it.
                surrogate = surrogate / tf.cast(distribute.num_replicas(), surrogate.dtype)
        indirect = tape.gradient(surrogate, hparams)
        if reduce is not None:
            indirect = reduce(indirect)
        return self._finish(hparams, direct, indirect, outer_loss,
                         _tree.tree_stop_gradient(final_params),
                         _tree.tree_stop_gradient(final_state))
