"""Exact reverse-mode hypergradients by running SGD with momentum backwards (Maclaurin,
Duvenaud & Adams, ICML 2015, "Gradient-based hyperparameter optimization through reversible
learning").

Forward: T steps of `optim.ema_momentum_sgd`, t = 0..T-1,

    g_t = grad_w L_in(w_t, phi, b_t)
    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t
    w_{t+1} = w_t + alpha_t v_{t+1}

Backward: from dw = d L_out/d w_T and dv = 0, for t = T-1..0 the step is undone exactly
(w_t = w_{t+1} - alpha_t v_{t+1}; g_t recomputed at w_t; v_t = (v_{t+1} + (1 - gamma_t) g_t) /
gamma_t) while the adjoints are carried back:

    d alpha_t = <dw, v_{t+1}>;   dv += alpha_t dw;   d gamma_t = <dv, v_t + g_t>
    dw -= (1 - gamma_t) H_t dv;  dphi -= (1 - gamma_t) (d^2 L_in / dphi dw) dv   (one VJP)
    dv *= gamma_t

and (d alpha_t, d gamma_t) reach phi through the schedules (``problem.inner_optimizer_hparams``);
with ``initial_params`` (w_0 as a function of phi, e.g. per-layer initialisation scales) the
final dw reaches phi too.

Exactness. w and v are int64 fixed-point numbers (value * 2^radix_bits): adding alpha v or
(1 - gamma) g is undone by subtracting the same rounded integer. Multiplying by gamma = n/d
(d = 2^momentum_bits) destroys log2(d/n) bits per weight, which an information buffer keeps:
a mixed-radix integer per weight into which v mod d is pushed (base d) before a digit is popped
(base n) into v // d * n, so that dividing by gamma is exact as well. Before the buffer's live
int64 word could overflow, its low 32 bits move to a stack of 32-bit words (two to an entry of
the size of an int64 array; the steps of the spills recorded) and the live word keeps the rest,
so the stack is packed full. Consequences: gamma is used as floor(gamma d) / d, and its
hypergradient is taken at that value; w is rounded to 2^-radix_bits per step and gamma v to
n 2^-radix_bits (the popped digit stands in for v mod d times n/d: an error below
2^(momentum_bits - radix_bits) per step, about 2e-10 at the defaults 48 and 16); |w|, |v| and
every step must stay below 2^(62 - radix_bits) (16384 at the default); the derivatives are those of the real-valued steps (the rounding is
not differentiated); the inner gradient must give the same bits when recomputed (TensorFlow's
CPU kernels do; on GPU call `tf.config.experimental.enable_op_determinism()`), which
`Reversible.reversal_check` verifies.

Cost: T gradients forward; backward T gradients inside one VJP each (about 3-4 gradients per
step). Memory: O(P) (w, v in int64 and float, dw, dv, one step's intermediates) plus the
buffer: 8 bytes per weight (the live word) + sum_t log2(1/gamma_t) bits per weight in 32-bit
words (rounded up to an even count); not O(T P) as `Unrolled`. The integer reversal and the
adjoint step of each backward step run one after the other (control dependencies), so that the
peak over the T steps does not grow with T.
"""

import math
from typing import NamedTuple

import tensorflow as tf

from keras_metapt import _tree, distribute, functional
from keras_metapt.hypergrad import problem as _p

__all__ = ["Reversible", "ReversalCheck"]

_RATES = ("learning_rate", "momentum")
_WORD = 2 ** 32  # the stack's words: the low 32 bits of the live word

_ONE_REPLICA = (
    "Reversible runs on one replica: its forward and reversed steps are tf.while_loops, where "
    "strategies forbid cross-replica sums. Under a tf.distribute strategy use Unrolled, "
    "Implicit, EvoGrad or PTFT with gradient_reduction=keras_metapt.distribute.replica_sum")


class ReversalCheck(NamedTuple):
    """What `Reversible.reversal_check` reports.

    exact: scalar bool, the reversed run reproduced w_0 and v_0 bit for bit.
    params_max_error, velocity_max_error: largest |recovered - initial| over all weights (in
      the parameters' units; 0 when exact).
    params, velocity: w_T and v_T after the forward run.
    buffer_bits: information held in the buffer at the end, sum over weights of
      log2(1 + the weight's buffer as one integer) = 32 * spills + log2(1 + live word).
    expected_bits: the bits that momentum decay destroyed, P * sum_t log2(d / n_t).
    buffer_bytes: bytes the buffer held at the end per weight: 8 (the live word) + 8 per two
      spills (an odd count leaves the last 8-byte entry half full).
    spills: how many 32-bit words per weight moved to the stack.
    """

    exact: tf.Tensor
    params_max_error: tf.Tensor
    velocity_max_error: tf.Tensor
    params: object
    velocity: object
    buffer_bits: tf.Tensor
    expected_bits: tf.Tensor
    buffer_bytes: tf.Tensor
    spills: tf.Tensor


class _Trajectory(NamedTuple):
    w: list          # int64 fixed point, one per params leaf
    v: list          # int64 fixed point
    live: list       # int64, the buffer's live word per weight
    stack: list      # per leaf, a TensorArray of [2, *shape] uint32: two spilled words each
    spilled: tf.Tensor   # int32, 32-bit words per weight on the stack
    spill_steps: tf.TensorArray  # int32: entry 0 is -1, entry k the step of the k-th spill
    buffer_bits: tf.Tensor
    expected_bits: tf.Tensor


class Reversible(_p.Estimator):
    """Exact reverse-mode hypergradient through T steps of SGD with momentum, by reversal.

    Args:
      num_steps: T.
      learning_rate, momentum: alpha and gamma where the problem's
        ``inner_optimizer_hparams(hparams, step, num_steps)`` does not set them (it may return
        "learning_rate" and "momentum", tensors that depend on hparams: schedules). gamma must
        lie in (0, 1]; it is used as floor(gamma 2^momentum_bits) / 2^momentum_bits (>= 2^-m).
      initial_params: None (w_0 = ``params``) or ``fn(params, hparams) -> w_0`` (for example
        per-layer initialisation scales times ``params``); its VJP takes d L_out / d w_0 to
        hparams.
      radix_bits: w and v are held as round(value * 2^radix_bits) in int64; every value must
        stay below 2^(62 - radix_bits) in magnitude (checked, naming the flag).
      momentum_bits: d = 2^momentum_bits, the denominator of gamma (1 <= m <= 30).
      gradient_reduction: must be None (refused with a ValueError): one replica.
      check_finite: see `Estimator`. ``seed`` is accepted and ignored.

    ``opt_state`` is the initial velocity v_0 (a nest like params; None: zeros); the result's
    ``opt_state`` is v_T and its ``params`` w_T. The optimizer with these steps, for `Unrolled`
    or `Forward`, is ``self.optimizer``.
    """

    def __init__(self, num_steps, learning_rate=0.1, momentum=0.9, *, initial_params=None,
                 radix_bits=48, momentum_bits=16, gradient_reduction=None, check_finite=True):
        if gradient_reduction is not None:
            raise ValueError(_ONE_REPLICA)
        super().__init__(check_finite=check_finite)
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 1 <= int(momentum_bits) <= 30:
            raise ValueError(f"momentum_bits must be in [1, 30], got {momentum_bits}")
        if not 1 <= int(radix_bits) <= 60:
            raise ValueError(f"radix_bits must be in [1, 60], got {radix_bits}")
        if initial_params is not None and not callable(initial_params):
            raise TypeError(f"initial_params must be None or fn(params, hparams), got "
                            f"{initial_params!r}")
        self.num_steps = int(num_steps)
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.initial_params = initial_params
        self.radix_bits = int(radix_bits)
        self.momentum_bits = int(momentum_bits)
        self._scale = 2.0 ** self.radix_bits
        self._denominator = 2 ** self.momentum_bits
        self._live_limit = 2 ** (62 - self.momentum_bits)

    @property
    def optimizer(self):
        """`optim.ema_momentum_sgd` with this estimator's default rates (the same steps)."""
        from keras_metapt import optim
        return optim.ema_momentum_sgd(self.learning_rate, self.momentum)

    # -- fixed point -----------------------------------------------------------------------
    def _to_int(self, x):
        y = tf.round(tf.cast(x, tf.float64) * self._scale)
        limit = 2.0 ** 62
        tf.debugging.assert_less(  # max |y| without a full-size |y| temporary
            tf.maximum(tf.reduce_max(y), -tf.reduce_min(y)), tf.constant(limit, tf.float64),
            message=(f"Reversible: a weight, velocity or step reached 2^{62 - self.radix_bits} "
                     f"in magnitude, beyond the int64 fixed point at radix_bits="
                     f"{self.radix_bits}; lower radix_bits or the learning rate"))
        return tf.cast(y, tf.int64)

    def _to_float(self, n, dtype):
        return tf.cast(tf.cast(n, tf.float64) / self._scale, dtype)

    def _floats(self, ints, dtypes):
        return [self._to_float(x, dt) for x, dt in zip(ints, dtypes)]

    def _initial_point(self, params, hparams):
        """w_0: ``params``, or ``initial_params(params, hparams)``."""
        return params if self.initial_params is None else self.initial_params(params, hparams)

    # -- the rates of step t -----------------------------------------------------------------
    def _rates(self, problem, hparams, t):
        """(alpha_t, gamma_t as given, n_t, gamma_t as used = n_t / d), float64 scalars."""
        overrides = {}
        if problem.inner_optimizer_hparams is not None:
            overrides = dict(problem.inner_optimizer_hparams(hparams, t, self.num_steps))
        unknown = sorted(set(overrides) - set(_RATES))
        if unknown:
            raise ValueError(f"Reversible steps have the hyperparameters {list(_RATES)}; "
                             f"inner_optimizer_hparams returned {unknown[0]!r}")
        alpha = _as_tensor(overrides.get("learning_rate", self.learning_rate))
        gamma = _as_tensor(overrides.get("momentum", self.momentum))
        gamma64 = tf.cast(gamma, tf.float64)
        tf.debugging.assert_greater(gamma64, tf.constant(0.0, tf.float64),
                                    message="Reversible: momentum must be in (0, 1]")
        tf.debugging.assert_less_equal(gamma64, tf.constant(1.0, tf.float64),
                                       message="Reversible: momentum must be in (0, 1]")
        d = self._denominator
        n = tf.clip_by_value(tf.cast(tf.floor(gamma64 * d), tf.int64), 1, d)
        used = tf.cast(n, tf.float64) / d
        return alpha, gamma, n, used

    # -- multiplying v by n/d and back, exactly ------------------------------------------------
    def _times_gamma(self, v, live, n):
        d = tf.constant(self._denominator, tf.int64)
        x = live * d + tf.math.floormod(v, d)          # push v mod d (base d)
        digit = tf.math.floormod(x, n)                   # pop a digit (base n)
        return tf.math.floordiv(v, d) * n + digit, tf.math.floordiv(x, n)

    def _divide_by_gamma(self, v, live, n):
        d = tf.constant(self._denominator, tf.int64)
        x = live * n + tf.math.floormod(v, n)
        remainder = tf.math.floormod(x, d)
        return tf.math.floordiv(v, n) * d + remainder, tf.math.floordiv(x, d)

    # -- the two passes --------------------------------------------------------------------
    @staticmethod
    def _gradient(problem, structure, w, hparams, inner_batch, t):
        batch = _p.batch_at(inner_batch, t)
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = _p.inner_loss_value(problem, tf.nest.pack_sequence_as(structure, w),
                                       hparams, batch)
        return tape.gradient(loss, w, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _forward(self, problem, structure, w0, v0, hparams, inner_batch):
        T = self.num_steps
        dtypes = [x.dtype for x in w0]
        w = [self._to_int(x) for x in w0]
        v = [self._to_int(x) for x in v0]
        live = [tf.zeros_like(x) for x in w]
        num_weights = sum(x.shape.num_elements() for x in w)
        # Spilled words are kept two to an entry (an entry per leaf is [2, *shape] uint32, the
        # size of the int64 arrays around it, which the allocator reuses without padding), and
        # the steps of the spills rather than a flag per step: nothing grows with T by itself.
        stack = [tf.TensorArray(tf.uint32, size=0, dynamic_size=True, clear_after_read=False,
                                element_shape=[2] + x.shape.as_list()) for x in w]
        spill_steps = tf.TensorArray(tf.int32, size=1, dynamic_size=True, element_shape=[],
                                     clear_after_read=False).write(0, -1)
        zero = tf.constant(0.0, tf.float64)
        log2_d = float(self.momentum_bits)

        def body(t, w, v, live, stack, spilled, spill_steps, expected_bits):
            spill = tf.reduce_any(tf.stack([tf.reduce_any(a >= self._live_limit) for a in live]))

            def move():
                return ([self._push_word(ta, tf.cast(tf.math.floormod(a, _WORD), tf.uint32),
                                         spilled) for ta, a in zip(stack, live)],
                        [tf.math.floordiv(a, _WORD) for a in live],
                        spilled + 1, spill_steps.write(spilled + 1, t))

            stack, live, spilled, spill_steps = tf.cond(
                spill, move, lambda: (stack, live, spilled, spill_steps))
            alpha, _, n, used = self._rates(problem, hparams, t)
            g = self._gradient(problem, structure, self._floats(w, dtypes), hparams,
                               inner_batch, t)
            new_w, new_v, new_live = [], [], []
            for wi, vi, ai, gi in zip(w, v, live, g):
                vi, ai = self._times_gamma(vi, ai, n)
                vi = vi - self._to_int((1.0 - used) * tf.cast(gi, tf.float64))
                wi = wi + self._to_int(tf.cast(alpha, tf.float64) * self._to_float(vi, tf.float64))
                new_w.append(wi)
                new_v.append(vi)
                new_live.append(ai)
            expected_bits = expected_bits + num_weights * (
                log2_d - tf.math.log(tf.cast(n, tf.float64)) / math.log(2.0))
            return t + 1, new_w, new_v, new_live, stack, spilled, spill_steps, expected_bits

        _, w, v, live, stack, spilled, spill_steps, expected_bits = tf.while_loop(
            lambda t, *_: t < T, body,
            (tf.constant(0), w, v, live, stack, tf.constant(0), spill_steps, zero),
            maximum_iterations=T, parallel_iterations=1)
        buffer_bits = 32.0 * num_weights * tf.cast(spilled, tf.float64) + _information_bits(live)
        return _Trajectory(w, v, live, stack, spilled, spill_steps, buffer_bits, expected_bits)

    @staticmethod
    def _push_word(stack, word, spilled):
        """Stack entry spilled // 2 gets ``word`` in row spilled % 2 (a new entry for an even
        count, the entry rewritten with its row 0 kept for an odd one)."""
        index = spilled // 2
        entry = tf.cond(tf.equal(spilled % 2, 0),
                        lambda: tf.stack([word, tf.zeros_like(word)]),
                        lambda: tf.stack([stack.read(index)[0], word]))
        return stack.write(index, entry)

    @staticmethod
    def _unspill(live, stack, spilled):
        """Undoes the last spill: live = live * 2^32 + the top word of the stack."""
        k = spilled - 1
        restored = []
        for a, ta in zip(live, stack):
            with tf.control_dependencies(restored[-1:]):  # one leaf at a time
                restored.append(a * _WORD + tf.cast(tf.gather(ta.read(k // 2), k % 2), tf.int64))
        return restored

    def _reverse(self, problem, structure, trajectory, dw, hparams, inner_batch, dtypes):
        """Undoes the steps T-1..0; returns (w_0 int, v_0 int, dw, dv, d hparams)."""
        T = self.num_steps
        flat_h = tf.nest.flatten(hparams)
        dv = [tf.zeros_like(x) for x in dw]
        dh = [tf.zeros_like(x) for x in flat_h]

        def body(t, w, v, live, stack, spilled, dw, dv, dh):
            with tf.GradientTape() as outer:
                outer.watch(flat_h)
                alpha, gamma, n, used = self._rates(problem, hparams, t)
                v_next = self._floats(v, dtypes)
                alpha64 = tf.cast(alpha, tf.float64)
                w = [wi - self._to_int(alpha64 * self._to_float(vi, tf.float64))
                     for wi, vi in zip(w, v)]
                w_t = self._floats(w, dtypes)
                outer.watch(w_t)
                g = self._gradient(problem, structure, w_t, hparams, inner_batch, t)
            new_v, new_live = [], []
            for vi, ai, gi in zip(v, live, g):
                # one leaf after another, so that their int64 temporaries do not add up
                with tf.control_dependencies(new_v[-1:] + new_live[-1:]):
                    vi = vi + self._to_int((1.0 - used) * tf.cast(gi, tf.float64))
                    vi, ai = self._divide_by_gamma(vi, ai, n)
                new_v.append(vi)
                new_live.append(ai)
            v, live = new_v, new_live
            live, spilled = tf.cond(
                tf.equal(trajectory.spill_steps.read(spilled), t),
                lambda: (self._unspill(live, stack, spilled), spilled - 1),
                lambda: (live, spilled))
            v_t = self._floats(v, dtypes)
            # The adjoint step waits for the integer reversal: in a graph the two would
            # otherwise interleave in an order that varies between steps, and the largest
            # overlap over T steps (so the peak memory) would grow with T.
            with tf.control_dependencies(v_t + live):
                d_alpha = _tree.tree_vdot(dw, v_next)
                dv = [a + tf.cast(alpha, a.dtype) * b for a, b in zip(dv, dw)]
                d_gamma = _tree.tree_vdot(dv, [a + b for a, b in zip(v_t, g)])
                cotangents = [-tf.cast(1.0 - used, x.dtype) * x for x in dv]
                vjp_w, vjp_h = outer.gradient(
                    [g, alpha, gamma], [w_t, flat_h],
                    output_gradients=[cotangents, tf.cast(d_alpha, alpha.dtype),
                                      tf.cast(d_gamma, gamma.dtype)],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
                dw = [a + b for a, b in zip(dw, vjp_w)]
                dh = [a + b for a, b in zip(dh, vjp_h)]
                dv = [tf.cast(used, x.dtype) * x for x in dv]
            return t - 1, w, v, live, stack, spilled, dw, dv, dh

        _, w, v, _, _, _, dw, dv, dh = tf.while_loop(
            lambda t, *_: t >= 0, body,
            (tf.constant(T - 1), trajectory.w, trajectory.v, trajectory.live, trajectory.stack,
             trajectory.spilled, dw, dv, dh),
            maximum_iterations=T, parallel_iterations=1)
        return w, v, dw, dv, dh

    def _start(self, params, hparams, inner_batch, opt_state):
        if distribute.num_replicas() > 1:
            raise ValueError(_ONE_REPLICA)
        params, hparams = _p.prepare(params, hparams, inner_batch, self.num_steps)
        velocity = (tf.nest.map_structure(tf.zeros_like, params) if opt_state is None
                    else _tree.to_tensors(opt_state))
        tf.nest.assert_same_structure(velocity, params)
        return params, hparams, velocity

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        params, hparams, velocity = self._start(params, hparams, inner_batch, opt_state)
        flat_h = tf.nest.flatten(hparams)
        with tf.GradientTape() as init_tape:
            init_tape.watch(flat_h)
            w0 = self._initial_point(params, hparams)
        flat_w0 = tf.nest.flatten(w0)
        dtypes = [x.dtype for x in flat_w0]
        trajectory = self._forward(problem, params, flat_w0, tf.nest.flatten(velocity),
                                   hparams, inner_batch)
        w_T = tf.nest.pack_sequence_as(params, self._floats(trajectory.w, dtypes))
        v_T = tf.nest.pack_sequence_as(params, self._floats(trajectory.v, dtypes))
        outer_loss, g_params, direct = _p.outer_gradients(problem, w_T, hparams, outer_batch)
        _, _, dw0, _, dh = self._reverse(problem, params, trajectory, tf.nest.flatten(g_params),
                                         hparams, inner_batch, dtypes)
        if self.initial_params is not None:
            init_h = init_tape.gradient(flat_w0, flat_h, output_gradients=dw0,
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
            dh = [a + b for a, b in zip(dh, init_h)]
        reached = self._reaches_inner_problem(problem, params, hparams, inner_batch)
        indirect = tf.nest.pack_sequence_as(
            hparams, [x if r else None for x, r in zip(dh, reached)])
        result = self._finish(hparams, direct, indirect, outer_loss, w_T, v_T,
                              scale=problem.outer_loss_scale)
        _refuse_xla()  # after tracing, so that errors in the inputs are named first
        return result

    def _reaches_inner_problem(self, problem, params, hparams, inner_batch):
        """Per hparams leaf: does it enter w_0, the rates or the inner gradient (read off a
        reverse-mode tape over step 0: structural in a graph; one gradient eagerly)?"""
        flat_h = tf.nest.flatten(hparams)
        with tf.GradientTape() as tape:
            tape.watch(flat_h)
            w0 = self._initial_point(params, hparams)
            alpha, gamma, _, _ = self._rates(problem, hparams, tf.constant(0))
            g = self._gradient(problem, params, tf.nest.flatten(w0), hparams, inner_batch,
                               tf.constant(0))
            total = tf.add_n([tf.reduce_sum(x) for x in tf.nest.flatten(w0) + g]
                             + [tf.cast(alpha, g[0].dtype), tf.cast(gamma, g[0].dtype)])
        return [r is not None for r in tape.gradient(total, flat_h)]

    def reversal_check(self, problem, params, hparams, inner_batch, *, opt_state=None):
        """Runs the T steps forward and back (no outer loss) and reports whether w_0 and v_0
        came back bit for bit, and the buffer's size against the bits destroyed (a
        `ReversalCheck`). Cost: T gradients forward, T VJPs back."""
        params, hparams, velocity = self._start(params, hparams, inner_batch, opt_state)
        w0 = self._initial_point(params, hparams)
        flat_w0, flat_v0 = tf.nest.flatten(w0), tf.nest.flatten(velocity)
        dtypes = [x.dtype for x in flat_w0]
        w0_int = [self._to_int(x) for x in flat_w0]
        v0_int = [self._to_int(x) for x in flat_v0]
        with functional.exact_batch_moments():
            trajectory = self._forward(problem, params, flat_w0, flat_v0, hparams, inner_batch)
            buffer_bytes = 8 + 8 * ((tf.cast(trajectory.spilled, tf.int64) + 1) // 2)
            w_T = self._floats(trajectory.w, dtypes)
            v_T = self._floats(trajectory.v, dtypes)
            w_back, v_back, _, _, _ = self._reverse(
                problem, params, trajectory, [tf.zeros_like(x) for x in w_T], hparams,
                inner_batch, dtypes)
        _refuse_xla()
        exact = tf.reduce_all(tf.stack(
            [tf.reduce_all(tf.equal(a, b)) for a, b in zip(w_back + v_back, w0_int + v0_int)]))
        return ReversalCheck(
            exact, _max_abs_error(w_back, w0_int) / self._scale,
            _max_abs_error(v_back, v0_int) / self._scale,
            tf.nest.pack_sequence_as(params, w_T), tf.nest.pack_sequence_as(params, v_T),
            trajectory.buffer_bits, trajectory.expected_bits, buffer_bytes, trajectory.spilled)


def _in_xla_context():
    """True while tracing inside tf.function(jit_compile=True) (TensorFlow's private
    control_flow_util, pinned by tests/hypergrad/test_reversible.py)."""
    from tensorflow.python.ops import control_flow_util
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _refuse_xla():
    if _in_xla_context():
        raise ValueError(
            "Reversible does not compile with XLA: its information buffer grows with the run "
            "(a TensorArray of dynamic size). Call it in tf.function without jit_compile")


def _as_tensor(value):
    """A rate as a tensor: tensors keep their dtype, Python numbers become float64 (exact)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.convert_to_tensor(value)
    return tf.constant(value, tf.float64)


def _information_bits(words):
    """sum over weights of log2(1 + word), float64."""
    return tf.add_n([tf.reduce_sum(tf.math.log1p(tf.cast(a, tf.float64))) for a in words]) / (
        math.log(2.0))


def _max_abs_error(a, b):
    return tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(tf.cast(x - y, tf.float64)))
                                   for x, y in zip(a, b)]))
