"""Reverse-mode hypergradients through T unrolled inner optimizer steps.

theta_{t+1} = U(theta_t, s_t, grad_theta L_in(theta_t, phi, b_t); h_t(phi)),  t = 0..T-1
hypergradient = d L_out(theta_T, phi) / d phi, by backpropagation through the steps.

Truncation to the last K steps (Shaban et al. 2019) treats theta_{T-K} as a
constant: only the last K steps are recorded and differentiated. K = 1 is the
greedy one-step (T1-T2) hypergradient.

Cost: T inner gradients forward, plus about 2 gradients per differentiated step
backward (second-order terms: one HVP and one mixed product per step).
Memory: O(K * P) for the recorded steps (O(T * P) untruncated).

Two backward passes (``backward=``):
- "reverse" (default): reverse-over-reverse through the recorded `tf.while_loop`. TensorFlow
  keeps every intermediate of every recorded step (activations of each inner gradient), so
  memory is O(K * (P + activations of one inner gradient)).
- "mixed" (MixFlow-MG style, Kemaev et al. 2025): the forward pass stores only (theta_t, s_t)
  and the inner gradient g_t of the K recorded steps (not g_t when the optimizer is
  ``affine_in_gradient`` and no hyperparameter enters its update: the update's VJP then needs
  no gradient value); the backward loop takes one step at a time: the VJP of the optimizer
  update with respect to (theta, s, g, phi), then the second-order terms H w and
  (d2 L / dphi dtheta) w for w = (dU/dg)^T a in one forward-over-reverse pass (a JVP of the
  (theta, phi)-gradient along w). Both loops run one
  iteration at a time. Memory: O(K * P) + one step's intermediates; cost about that of
  "reverse" (a forward-over-reverse pass per step instead of reverse-over-reverse). Same
  result to float rounding.
"""

import tensorflow as tf

from keras_metapt import _tree, distribute
from keras_metapt.hypergrad import problem as _p

__all__ = ["Unrolled", "BACKWARD_MODES"]

BACKWARD_MODES = ("reverse", "mixed")


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
      backward: "reverse" (reverse-over-reverse through the loop) or "mixed" (per-step
        rebuild with forward-over-reverse second-order products; less memory, see the module
        docstring). "mixed" runs on one device (no gradient_reduction).
      check_finite: see `Estimator`. ``seed`` is accepted and ignored (deterministic).
    """

    def __init__(self, optimizer, num_steps, truncate=None, *, backward="reverse",
                 gradient_reduction=None, check_finite=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        if backward == "mixed" and gradient_reduction is not None:
            raise ValueError('backward="mixed" runs on one device; use backward="reverse" with '
                             "gradient_reduction")
        self.backward = backward
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
        if self.backward == "mixed":
            return self._mixed(problem, params, opt_state, hparams, inner_batch, outer_batch,
                               T - K, T)

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
                            _tree.tree_stop_gradient(final_state),
                            scale=problem.outer_loss_scale)

    def _mixed(self, problem, params, opt_state, hparams, inner_batch, outer_batch, start, stop):
        """Steps start..stop-1 storing only (theta_t, s_t), then the per-step backward loop."""
        optimizer, T = self.optimizer, self.num_steps
        p_leaves, s_leaves = tf.nest.flatten(params), tf.nest.flatten(opt_state)
        # g_t is needed by the update's VJP unless the update is affine in it and no
        # hyperparameter enters the update (whose VJP would read g_t, e.g. d/d lr = -g_t)
        keep_grads = not (getattr(optimizer, "affine_in_gradient", False)
                          and problem.inner_optimizer_hparams is None)
        # per step: theta_t, s_t and, if keep_grads, the inner gradient g_t (O(K * P) in all)
        stored = [tf.TensorArray(x.dtype, size=stop - start, element_shape=x.shape)
                  for x in p_leaves + s_leaves + (p_leaves if keep_grads else [])]

        def forward(t, p, st, arrays):
            theta = tf.nest.pack_sequence_as(params, p)
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = _p.inner_loss_value(problem, theta, hparams, _p.batch_at(inner_batch, t))
            grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            arrays = [a.write(t - start, x) for a, x in zip(
                arrays, p + st + (tf.nest.flatten(grads) if keep_grads else []))]
            new_p, new_s = optimizer.update(grads, tf.nest.pack_sequence_as(opt_state, st),
                                            theta, **self._overrides(problem, hparams, t))
            return t + 1, tf.nest.flatten(new_p), tf.nest.flatten(new_s), arrays

        # parallel_iterations=1 here and below: the executor would otherwise run the
        # adjoint-independent work of later iterations ahead, holding several steps'
        # intermediates at once (O(10) steps of activations instead of one)
        _, p_final, s_final, stored = tf.while_loop(
            lambda t, *_: t < stop, forward, (tf.constant(start), p_leaves, s_leaves, stored),
            maximum_iterations=stop - start, parallel_iterations=1)
        final_params = tf.nest.pack_sequence_as(params, p_final)
        final_state = tf.nest.pack_sequence_as(opt_state, s_final)
        outer_loss, g_params, direct = _p.outer_gradients(problem, final_params, hparams,
                                                          outer_batch)
        h_leaves = tf.nest.flatten(hparams)
        floats = [i for i, x in enumerate(s_leaves) if x.dtype.is_floating]

        def backward(t, a_p, a_s, a_h):
            values = [a.read(t - start) for a in stored]
            n = len(p_leaves)
            theta = tf.nest.pack_sequence_as(params, values[:n])
            state_leaves = values[n:n + len(s_leaves)]
            grads = tf.nest.pack_sequence_as(params, values[n + len(s_leaves):] if keep_grads
                                             else [tf.zeros_like(x) for x in values[:n]])
            batch = _p.batch_at(inner_batch, t)
            # VJP of the update U(theta, s, g; h(phi)) along (a_p, a_s)
            watched = tf.nest.flatten(theta) + [state_leaves[i] for i in floats] \
                + tf.nest.flatten(grads) + h_leaves
            with tf.GradientTape() as tape:
                tape.watch(watched)
                new_p, new_s = optimizer.update(
                    grads, tf.nest.pack_sequence_as(opt_state, state_leaves), theta,
                    **self._overrides(problem, hparams, t))
                targets = tf.nest.flatten(new_p) + [tf.nest.flatten(new_s)[i] for i in floats]
            cotangents = tape.gradient(targets, watched, output_gradients=list(a_p) + list(a_s),
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
            n_p, n_s = len(p_leaves), len(floats)
            d_theta = cotangents[:n_p]
            d_state = cotangents[n_p:n_p + n_s]
            w = cotangents[n_p + n_s:2 * n_p + n_s]
            d_h = cotangents[2 * n_p + n_s:]
            # forward-over-reverse: H w and (d2 L / dphi dtheta) w in one pass
            theta_leaves = tf.nest.flatten(theta)
            with tf.autodiff.ForwardAccumulator(theta_leaves, w) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(theta_leaves + h_leaves)
                    loss = _p.inner_loss_value(problem, tf.nest.pack_sequence_as(params,
                                                                                 theta_leaves),
                                               hparams, batch)
                g_theta, g_h = tape.gradient(loss, (theta_leaves, h_leaves),
                                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
            hw = acc.jvp(g_theta, tf.UnconnectedGradients.ZERO)
            mw = acc.jvp(g_h, tf.UnconnectedGradients.ZERO)
            return (t - 1, [a + b for a, b in zip(d_theta, hw)], d_state,
                    [a + b + c for a, b, c in zip(a_h, d_h, mw)])

        a_p = tf.nest.flatten(g_params)
        a_s = [tf.zeros_like(s_leaves[i]) for i in floats]
        a_h = [tf.zeros_like(h) for h in h_leaves]
        _, _, _, a_h = tf.while_loop(lambda t, *_: t >= start, backward,
                                     (tf.constant(stop - 1), a_p, a_s, a_h),
                                     maximum_iterations=stop - start, parallel_iterations=1)
        connected = self._connected(problem, params, hparams, inner_batch, start)
        indirect = tf.nest.pack_sequence_as(
            hparams, [a if c else None for a, c in zip(a_h, connected)])
        return self._finish(hparams, direct, indirect, outer_loss,
                            _tree.tree_stop_gradient(final_params),
                            _tree.tree_stop_gradient(final_state),
                            scale=problem.outer_loss_scale)

    def _overrides(self, problem, hparams, step):
        if problem.inner_optimizer_hparams is None:
            return {}
        return problem.inner_optimizer_hparams(hparams, step, self.num_steps)

    def _connected(self, problem, params, hparams, inner_batch, step):
        """Per hparams leaf: does it enter the inner loss or the optimizer's overrides (else
        its indirect term is None, as reverse mode reports it)? Traced once per call."""
        leaves = tf.nest.flatten(hparams)
        with tf.GradientTape() as tape:
            tape.watch(leaves)
            probe = _p.inner_loss_value(problem, params, hparams, _p.batch_at(inner_batch, step))
            for value in tf.nest.flatten(self._overrides(problem, hparams, step)):
                if isinstance(value, tf.Tensor) and value.dtype.is_floating:
                    probe += tf.reduce_sum(tf.cast(value, probe.dtype))
        return [g is not None for g in tape.gradient(probe, leaves)]
