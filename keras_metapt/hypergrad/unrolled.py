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

from keras_metapt import _tree
from keras_metapt.hypergrad import problem as _p

__all__ = ["Unrolled"]


class Unrolled:
    """Reverse-mode (backprop-through-training) hypergradient estimator.

    Args:
      optimizer: a `keras_metapt.optim.InnerOptimizer` for the inner steps.
      num_steps: T, the number of inner steps.
      truncate: K, differentiate through the last K steps only (None: all T).
    """

    def __init__(self, optimizer, num_steps, truncate=None):
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if truncate is not None and not 1 <= int(truncate) <= int(num_steps):
            raise ValueError(f"truncate must be in [1, num_steps={num_steps}], got {truncate}")
        self.optimizer = optimizer
        self.num_steps = int(num_steps)
        self.truncate = None if truncate is None else int(truncate)

    def __call__(self, problem, params, hparams, inner_batch, outer_batch, opt_state=None):
        params, hparams = _p.prepare(params, hparams, inner_batch, self.num_steps)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        T = self.num_steps
        K = T if self.truncate is None else self.truncate

        # Steps 0 .. T-K-1 are run without recording: theta_{T-K} is a constant.
        frozen = _tree.tree_stop_gradient(hparams)
        params, opt_state = _p.run_inner_steps(problem, self.optimizer, params, opt_state, frozen,
                                               inner_batch, 0, T - K, T)
        params = _tree.tree_stop_gradient(params)
        opt_state = _tree.tree_stop_gradient(opt_state)

        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(hparams))
            final_params, final_state = _p.run_inner_steps(
                problem, self.optimizer, params, opt_state, hparams, inner_batch, T - K, T, T)
            # d L_out / d theta_T, taken inside the tape so that the indirect term is
            # <d L_out / d theta_T, d theta_T / d phi> computed as one VJP.
            outer_loss, g_params, direct = _p.outer_gradients(problem, final_params, hparams,
                                                              outer_batch)
            g_params = _tree.tree_stop_gradient(g_params)
            surrogate = _tree.tree_vdot(g_params, final_params)
        indirect = tape.gradient(surrogate, hparams)
        return _p.finish(hparams, direct, indirect, outer_loss,
                         _tree.tree_stop_gradient(final_params),
                         _tree.tree_stop_gradient(final_state))
