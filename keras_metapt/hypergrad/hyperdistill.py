"""Online hypergradients by hypergradient distillation (HyperDistill; Lee et al., ICLR 2022).

Online hyperparameter learning takes a hypergradient at every inner step t of one training
run, w_t = Phi(w_{t-1}, phi; D_t). With A_j = dPhi_j / dw_{j-1}, B_s = dPhi_s / dphi and
alpha_t = dL_out(w_t) / dw_t, the online hypergradient over the whole past (phi held fixed
along it), damped by gamma in [0, 1], is

    d L_out / d phi = direct + alpha_t^T sum_{s=1..t} gamma^(t-s) A_t ... A_{s+1} B_s .

gamma = 1 is the undamped full-horizon term; gamma = 0 keeps s = t only, the greedy one-step
hypergradient (``Unrolled(optimizer, 1)``), which is biased toward the short horizon.
HyperDistill replaces the sum by ONE vector-Jacobian product of the step, taken at a
distilled point with a distilled scale:

    second-order term ~= pi_t * alpha_t^T B(w_hat_t; D_t)
    w_hat_t = w_0 + p_t (w_{t-1} - w_0)
    p_t     = sum_s gamma^(t-s) (s - 1) / ((t - 1) c_t),   c_t = sum_s gamma^(t-s) = (1 - gamma^t) / (1 - gamma)
    pi_t    = theta * c_t

w_hat_t is the gamma-weighted mean of the past points w_{s-1} when the trajectory is a line
from w_0 to w_{t-1} (DrMAD's assumption) and B is linear in w over it: the point needs only
w_0 and the current weights, so memory is constant in t. The scale theta absorbs what the
replacement A_j ~ I ignores; it is distilled: every ``distill_every`` steps a reference
term y_t is computed by a DrMAD-style backward pass (the damped sum above, over the last
``reference_steps`` steps, on weights interpolated linearly from w_0 to w_t and on the current
inner batch), and theta is the least-squares fit of theta c_t v_t to y_t over every reference
so far (v_t = alpha_t^T B(w_hat_t)): theta = sum c <v, y> / sum c^2 |v|^2. One reference
far larger than the others (a line whose step Jacobians expand) then sets theta for the rest
of the run; ``scale_fit="median"`` takes the median of the per-reference fits
<v, y> / (c |v|^2) over the last ``median_window`` references instead, which such an outlier
does not move.

The official repository of the paper holds no code; this follows the paper's description:
the distilled point on the line from w_0 to w_{t-1}, a scale proportional to the geometric
sum c_t fitted to DrMAD-style references. What is ours: the least-squares fit over all
references so far, the reference horizon cap, and the current inner batch at every reference
step (no batches are stored).

Cost per call: one inner step (1 gradient) and one outer gradient, as the one-step estimator,
plus one vector-Jacobian product of the step at w_hat (a gradient of a gradient) in place of
the one-step estimator's backward pass through its step; a reference adds min(t,
reference_steps) such products every ``distill_every`` steps (min(m, reference_steps)
with a moving anchor, m the steps since it). Memory: O(P) (w_0 is kept).

State: ``start(params)`` records w_0 and resets the step count and the fit; every call
advances the step. Steps the run takes without the estimator (plain training steps between
hypersteps) are counted by ``advance(n)``, so t, p_t and c_t stay in inner steps; a reference
is then taken at the first call at or after each multiple of ``distill_every``, and the anchor
moves at the first call with t - 1 at or after each multiple of ``anchor_every`` (with a call
at every step: exactly at the multiples; a gap over several multiples gives one reference). A
reference and an anchor move at the same call: the reference runs over the segment that ends
there, from the anchor before the move. Checkpoints written before `advance` existed lack
its counter and do not restore with ``assert_consumed``. `checkpoint_items()` holds the state for
`tf.train.Checkpoint`.
"""

import tensorflow as tf

from keras_metapt import _tree, distribute
from keras_metapt.hypergrad import problem as _p

__all__ = ["HyperDistill", "distilled_point_fraction", "geometric_sum",
           "damped_second_order_term"]

_ONE_REPLICA = ("HyperDistill runs on one replica (its references are a tf.while_loop, where "
                "strategies forbid cross-replica sums). Under a tf.distribute strategy use "
                "Unrolled, Implicit, EvoGrad or PTFT with gradient_reduction="
                "keras_metapt.distribute.replica_sum")


def geometric_sum(t, gamma):
    """c_t = sum_{k=0}^{t-1} gamma^k (float64; t a scalar tensor >= 1, gamma a Python float)."""
    t = tf.cast(t, tf.float64)
    if gamma == 1.0:
        return t
    return (1.0 - tf.pow(tf.constant(gamma, tf.float64), t)) / (1.0 - gamma)


def distilled_point_fraction(t, gamma):
    """p_t = sum_{s=1}^t gamma^(t-s) (s-1) / ((t-1) c_t), the position of w_hat_t on the line
    from w_0 (p = 0) to w_{t-1} (p = 1); p_1 = 1 (both ends coincide). gamma = 1 gives 1/2,
    gamma = 0 gives 1. Closed form: sum_s gamma^(t-s) (s-1) = (t-1) c_t - sum_{k<t} k gamma^k,
    sum_{k<n} k g^k = g (1 - n g^(n-1) + (n-1) g^n) / (1-g)^2. float64."""
    t = tf.cast(t, tf.float64)
    if gamma == 1.0:
        return tf.where(t > 1.0, tf.constant(0.5, tf.float64), tf.constant(1.0, tf.float64))
    g = tf.constant(gamma, tf.float64)
    c = geometric_sum(t, gamma)
    weighted_k = g * (1.0 - t * tf.pow(g, t - 1.0) + (t - 1.0) * tf.pow(g, t)) / (1.0 - g) ** 2
    numerator = (t - 1.0) * c - weighted_k
    return tf.where(t > 1.0, numerator / tf.maximum((t - 1.0) * c, 1e-300), 1.0)


def damped_second_order_term(step_vjp, point_at, num_points, cotangent, gamma, hparams):
    """y = sum_{k=0}^{n-1} gamma^(n-1-k) a_k^T B_k by one backward pass over n steps.

    ``point_at(k)`` is the weight point before step k (k = 0 .. n-1, the last is the newest);
    ``step_vjp(w, a) -> (a^T dPhi/dw, a^T dPhi/dphi)`` at w. Backward: a <- cotangent; for
    k = n-1 .. 0: y += a^T B_k, a <- gamma a^T A_k (``hparams`` gives y's structure; leaves
    the step does not reach get zeros). Cost: n step VJPs (gradients of gradients), one at a
    time in a `tf.while_loop`; memory O(P).
    """

    def body(k, a, y):
        a_w, a_phi = step_vjp(point_at(k), a)
        y = _tree.tree_add(y, _tree.zeros_for_none(a_phi, hparams))
        a = tf.nest.map_structure(lambda x: _tree.cast_scalar(gamma, x.dtype) * x, a_w)
        return k - 1, a, y

    y0 = tf.nest.map_structure(tf.zeros_like, hparams)
    graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    known = None if graph is None else len(graph.get_operations())
    _, _, y = tf.while_loop(lambda k, a, y: k >= 0, body,
                            (tf.cast(num_points, tf.int32) - 1, cotangent, y0),
                            parallel_iterations=1)
    if graph is not None:
        _keep_functional(graph.get_operations()[known:])
    return y


def _keep_functional(ops):
    """Keeps the While ops among ``ops`` functional (not lowered to Switch/Merge frames).

    Grappler's memory optimizer may rewrite a large AddN of the step VJP (a gradient summed
    over several uses) into a temporary variable that accumulates its inputs. In a lowered
    loop that variable is also created in the exit iteration, where the body is dead and
    nothing destroys it, so the next reference of the same compiled function fails with
    "AlreadyExists: Resource __per_step_0/.../tmp_var/frame:.../iter:<n>" (seen with a
    convolutional encoder whose inputs pass through a learned warp). A functional While runs
    its body as a function call per iteration, which creates and destroys the variable in
    the same call. The loop is never differentiated, so nothing else changes.
    """
    from tensorflow.core.framework import attr_value_pb2

    for op in ops:
        if op.type in ("While", "StatelessWhile"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))


class _State(tf.Module):
    """The anchor (w_0, or the latest moved anchor) and its step, the step count and the
    running sums of the scale's least-squares fit."""

    def __init__(self, params, median_window=None):
        super().__init__(name="hyperdistill")
        self.anchor_params = [tf.Variable(x, trainable=False, name="anchor_params")
                              for x in tf.nest.flatten(params)]
        self.anchor_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="anchor_step")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.fit_cross = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="fit_cross")
        self.fit_square = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="fit_square")
        self.references = tf.Variable(0, dtype=tf.int64, trainable=False, name="references")
        self.pending_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                         name="pending_steps")
        if median_window:  # the last per-reference fits (scale_fit="median")
            self.ratios = tf.Variable(tf.zeros([median_window], tf.float64), trainable=False,
                                      name="ratios")
            self.ratio_count = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name="ratio_count")


class HyperDistill(_p.Estimator):
    """Online hypergradient at the current step: one step VJP at a distilled point, scaled
    by a distilled factor (module docstring).

    Args:
      optimizer: the `keras_metapt.optim.InnerOptimizer` of the inner step (as the one-step
        estimator's look-ahead: ``Unrolled(optimizer, 1)``).
      gamma: the damping of the online hypergradient, in [0, 1].
      distill_every: a reference (and a refit of theta) every this many steps, at the first
        call at or after steps distill_every, 2 distill_every, ... (with a call at every
        step: at those calls); 0: never (theta stays ``initial_scale``).
      reference_steps: the reference's horizon cap, in steps.
      initial_scale: theta before the first reference.
      scale_fit: "least_squares" (default): theta fitted over every reference so far;
        "median": the median of the last ``median_window`` per-reference fits (robust to a
        reference that blows up; ours).
      anchor_every: None (the paper's): the line runs from w_0. An integer N: the anchor
        moves to the current weights every N steps (at the first call with t - 1 at or
        after N, 2N, ...; with a call at every step: t = N+1, 2N+1, ...), and the
        distilled point and the references use the line from it, over the m = t - t_anchor
        steps since (p_m in place of p_t; the scale keeps c_t). For one long run whose
        damped horizon 1 / (1 - gamma) is much shorter than the run, where the line from w_0
        would mix in the random initialisation. One more copy of the weights.
      gradient_reduction: must be None (one replica; refused with a ValueError).
      check_finite: see `Estimator`. ``seed`` is accepted and ignored.
    Call ``start(params)`` before the first call, with the run's initial weights w_0.
    ``params`` of a call are w_{t-1}; ``result.params`` are w_t after one step of
    ``optimizer`` on ``inner_batch`` (the look-ahead the hypergradient is taken at).
    """

    def __init__(self, optimizer, gamma=0.99, *, distill_every=100, reference_steps=100,
                 initial_scale=1.0, anchor_every=None, scale_fit="least_squares",
                 median_window=64, gradient_reduction=None,
                 check_finite=True):
        if gradient_reduction is not None:
            raise ValueError(_ONE_REPLICA)
        super().__init__(check_finite=check_finite)
        if not (0.0 <= float(gamma) <= 1.0 - 1e-4 or float(gamma) == 1.0):
            # the closed form of p_t loses digits as gamma -> 1 (1e-3 relative at 1 - 1e-7)
            raise ValueError(f"gamma must be in [0, 0.9999] or exactly 1, got {gamma}")
        if int(distill_every) < 0 or int(reference_steps) < 1:
            raise ValueError(f"distill_every must be >= 0 and reference_steps >= 1, got "
                             f"{distill_every} and {reference_steps}")
        self.optimizer = optimizer
        self.gamma = float(gamma)
        self.distill_every = int(distill_every)
        self.reference_steps = int(reference_steps)
        self.initial_scale = float(initial_scale)
        if scale_fit not in ("least_squares", "median") or int(median_window) < 1:
            raise ValueError(f"scale_fit must be 'least_squares' or 'median' and median_window "
                             f">= 1, got {scale_fit!r} and {median_window}")
        self.scale_fit = scale_fit
        self.median_window = int(median_window) if scale_fit == "median" else None
        if anchor_every is not None and int(anchor_every) < 1:
            raise ValueError(f"anchor_every must be None or >= 1, got {anchor_every}")
        self.anchor_every = None if anchor_every is None else int(anchor_every)
        self.state = None

    def start(self, params):
        """Records w_0 = ``params`` and resets the step count and the scale's fit."""
        params = _tree.to_tensors(params)
        if self.state is None:
            self.state = _State(params, self.median_window)
        else:
            kept = [tuple(v.shape) for v in self.state.anchor_params]
            given = [tuple(x.shape) for x in tf.nest.flatten(params)]
            if kept != given:
                raise ValueError(f"start(params): the weights' shapes {given} differ from those "
                                 f"this HyperDistill was started with, {kept}; make a new one")
            for var, x in zip(self.state.anchor_params, tf.nest.flatten(params)):
                var.assign(x)
            for var in (self.state.step, self.state.references, self.state.anchor_step,
                        self.state.pending_steps):
                var.assign(0)
            for var in (self.state.fit_cross, self.state.fit_square):
                var.assign(0.0)
            if self.median_window:
                self.state.ratios.assign(tf.zeros_like(self.state.ratios))
                self.state.ratio_count.assign(0)
        return self

    def advance(self, num_steps):
        """Counts ``num_steps`` inner steps the run took without calling the estimator (e.g.
        the plain steps between two hypersteps): the next call's weights are then
        w_(t-1) with t - 1 = the steps taken in all. Costs nothing."""
        self._require_started()
        if isinstance(num_steps, int) and num_steps < 0:
            raise ValueError(f"advance(num_steps) needs num_steps >= 0, got {num_steps}")
        num_steps = tf.cast(num_steps, tf.int64)
        if tf.executing_eagerly():
            tf.debugging.assert_non_negative(num_steps, "advance(num_steps) needs num_steps >= 0")
        self.state.step.assign_add(num_steps)
        self.state.pending_steps.assign_add(num_steps)
        return self

    def checkpoint_items(self):
        self._require_started()
        return {"hyperdistill": self.state}

    @property
    def scale(self):
        """theta: the fitted scale (``initial_scale`` before any reference)."""
        self._require_started()
        if self.median_window:
            state = self.state
            n = tf.minimum(state.ratio_count, self.median_window)
            ordered = tf.sort(state.ratios[:tf.maximum(n, 1)])  # one (unused) entry at n = 0
            median = 0.5 * (tf.gather(ordered, tf.maximum(n - 1, 0) // 2)
                            + tf.gather(ordered, n // 2))
            return tf.where(n > 0, median, tf.constant(self.initial_scale, tf.float64))
        return tf.where(self.state.fit_square > 0.0,
                        self.state.fit_cross / tf.maximum(self.state.fit_square, 1e-300),
                        tf.constant(self.initial_scale, tf.float64))

    def _require_started(self):
        if self.state is None:
            raise ValueError("HyperDistill needs start(initial_params) before its first call: "
                             "it keeps the run's initial weights w_0")

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        self._check_call(inner_batch)
        if getattr(problem, "outer_loss_scale", None) is not None:
            raise ValueError("HyperDistill does not take a problem with outer_loss_scale: its "
                             "fitted scale theta mixes the calls' outer gradients (run it in "
                             "float32 or bfloat16, which need no loss scaling)")
        params, hparams = _p.prepare(params, hparams)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        new_params, new_state = _p.inner_step(problem, self.optimizer, params, opt_state,
                                              hparams, inner_batch, tf.constant(0), 1)
        new_params = tf.nest.map_structure(tf.stop_gradient, new_params)
        outer_loss, alpha, direct = _p.outer_gradients(problem, new_params, hparams, outer_batch)
        indirect = self._distilled(problem, params, hparams, inner_batch, alpha, opt_state,
                                   new_params)
        return self._finish(hparams, direct, indirect, outer_loss, new_params, new_state)

    def distilled_term(self, problem, params, hparams, inner_batch, cotangent, *,
                       opt_state=None, update_state=True):
        """The second-order term alone, for a caller with its own outer gradient:
        pi_t cotangent^T B(w_hat_t) with ``params`` as both w_(t-1) and the end of the
        references' line, ``cotangent`` = d L_out / d params there (e.g. `PTFT`'s PT stage,
        where the FT unroll gives it). Advances the step as a call does; returns a nest like
        ``hparams`` (None where phi does not reach the step). ``update_state=False``: the
        term at the current state (t = step + 1, the current anchor and scale), with no
        reference, no anchor move and no step counted. Cost: one step VJP, plus a
        reference's step VJPs when one is due."""
        self._check_call(inner_batch)
        params, hparams = _p.prepare(params, hparams)
        if opt_state is None:
            opt_state = self.optimizer.init(params)
        return self._distilled(problem, params, hparams, inner_batch, cotangent, opt_state,
                               params, update_state)

    def _check_call(self, inner_batch):
        self._require_started()
        if distribute.num_replicas() > 1:
            raise ValueError(_ONE_REPLICA)
        if isinstance(inner_batch, _p.StepBatches):
            raise ValueError("HyperDistill takes the one inner batch of the current step; got "
                             "StepBatches")

    def _distilled(self, problem, params, hparams, inner_batch, alpha, opt_state, line_end,
                   update_state=True):
        """pi_t alpha^T B(w_hat_t) at w_(t-1) = ``params``; references run on the line from
        the anchor to ``line_end`` (w_t). Advances the step (unless not ``update_state``)."""
        state = self.state
        t = state.step + 1
        previous_t = t - 1 - state.pending_steps  # the previous call's t (0 before the first)

        def crossed(t_now, t_before, every):  # a multiple of ``every`` in (t_before, t_now]
            return tf.math.floordiv(t_now, every) > tf.math.floordiv(t_before, every)

        # a reference at this call runs over the segment from the anchor before any move
        reference_anchor = tf.nest.pack_sequence_as(
            params, [v.read_value() for v in state.anchor_params])
        reference_anchor_step = state.anchor_step.read_value()
        if self.anchor_every and update_state:
            def move_anchor():
                for var, x in zip(state.anchor_params, tf.nest.flatten(params)):
                    var.assign(x)
                state.anchor_step.assign(t - 1)
                return tf.constant(True)

            tf.cond((t > 1) & crossed(t - 1, tf.maximum(previous_t - 1, 0), self.anchor_every),
                    move_anchor, lambda: tf.constant(False))
        anchor = tf.nest.pack_sequence_as(params, [v.read_value() for v in state.anchor_params])
        anchor_step = state.anchor_step.read_value()
        m = t - anchor_step  # steps since the anchor (t without anchor_every)

        def step(w, h):
            return _p.inner_step(problem, self.optimizer, w, opt_state, h, inner_batch,
                                 tf.constant(0), 1)

        def step_vjp(w, cotangent):
            with tf.GradientTape() as tape:
                tape.watch(tf.nest.flatten(w) + tf.nest.flatten(hparams))
                stepped, _ = step(w, hparams)
            a_w, a_phi = tape.gradient(stepped, (w, hparams), output_gradients=cotangent)
            a_w = tf.nest.map_structure(tf.convert_to_tensor, _tree.zeros_for_none(a_w, w))
            return a_w, a_phi  # a_phi: None where phi does not reach the step

        def on_line(start, end, fraction):
            return tf.nest.map_structure(
                lambda a, b: a + tf.cast(fraction, a.dtype) * (b - a), start, end)

        w_hat = on_line(anchor, params, distilled_point_fraction(m, self.gamma))
        _, v = step_vjp(w_hat, alpha)
        c = geometric_sum(t, self.gamma)

        if self.distill_every and update_state:
            def distill():
                reference_m = t - reference_anchor_step
                n = tf.minimum(reference_m, self.reference_steps)

                def point_at(k):  # w_{s-1} for s = t - n + 1 + k, on the line anchor -> w_t
                    s = tf.cast(t - n + 1, tf.float64) + tf.cast(k, tf.float64)
                    position = ((s - 1.0 - tf.cast(reference_anchor_step, tf.float64))
                                / tf.cast(reference_m, tf.float64))
                    return on_line(reference_anchor, line_end, position)

                y = damped_second_order_term(step_vjp, point_at, n, alpha, self.gamma, hparams)
                v_flat = tf.nest.flatten(_tree.zeros_for_none(v, hparams))
                cross = tf.cast(_tree.tree_vdot(v_flat, tf.nest.flatten(y)), tf.float64)
                square = tf.cast(_tree.tree_vdot(v_flat, v_flat), tf.float64)
                # a non-finite reference is skipped: it would spoil the fit for the whole run
                finite = tf.math.is_finite(cross) & tf.math.is_finite(square)
                zero = tf.constant(0.0, tf.float64)
                state.fit_cross.assign_add(tf.where(finite, c * cross, zero))
                state.fit_square.assign_add(tf.where(finite, c * c * square, zero))
                state.references.assign_add(tf.cast(finite, tf.int64))
                if self.median_window:
                    usable = finite & (square > 0.0)
                    ratio = cross / tf.maximum(c * square, 1e-300)
                    index = tf.math.floormod(state.ratio_count, self.median_window)
                    state.ratios.assign(tf.where(
                        usable & tf.equal(tf.range(self.median_window, dtype=tf.int64), index),
                        ratio, state.ratios))
                    state.ratio_count.assign_add(tf.cast(usable, tf.int64))
                return tf.constant(True)

            tf.cond(crossed(t, previous_t, self.distill_every), distill,
                    lambda: tf.constant(False))
        pi = self.scale * c
        indirect = tf.nest.map_structure(
            lambda x: None if x is None else tf.cast(pi, x.dtype) * x, v)
        if update_state:
            state.step.assign_add(1)
            state.pending_steps.assign(0)
        return indirect

