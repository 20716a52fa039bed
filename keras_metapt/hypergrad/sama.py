"""First-order IFT hypergradients in the style of SAMA (Choe et al., NeurIPS 2023).

The IFT hypergradient  dL_out/dphi - M H^-1 g,  with g = dL_out/dtheta, H = d2 L_in/dtheta2 and
M = d2 L_in / dphi dtheta, is approximated with first-order passes only:

  1. H^-1 is replaced by the Jacobian P of the inner optimizer's update with respect to the
     gradient ("the base Jacobian inverse approximated away", plus SAMA's correction for
     adaptive optimizers): P = -d theta_new / d grad at the current gradient and optimizer
     state (lr I for SGD; Adam's diagonal preconditioner for Adam), one JVP of the elementwise
     update. Without an optimizer, P = I.
  2. The mixed product M v (v = P g) is a central finite difference of first-order gradients:
       M v ~ [dL_in/dphi(theta + eps v) - dL_in/dphi(theta - eps v)] / (2 eps),
     with eps = radius / ||v||; its error is O(eps^2) (exact when dL_in/dphi is quadratic in
     theta).

The result is exact when P = H^-1 (e.g. a quadratic inner loss with H = I / lr under SGD at
rate lr) and the finite difference is exact. Cost: 1 outer gradient + 2 gradients of L_in
with respect to phi (+ 1 inner gradient and 1 JVP of the update with an optimizer); no
second-order terms. Memory: O(P): the outer and the inner gradient, P v and one shifted copy
of the parameters at a time. An elementwise optimizer is differentiated one leaf at a time;
with ``fuse_update`` (default) inside a traced function, each leaf's JVP is one XLA-compiled
loop that holds none of the update's temporaries. In a traced function without XLA, control
dependencies run the passes one after another (the inner gradient after the outer one, the
two shifted passes in turn), so no two of them hold their tensors at once (eagerly they run
in turn anyway; under XLA the order is XLA's). Under tf.distribute, the outer gradients and
the finite difference are each reduced once.
"""

import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.hypergrad import problem as _p

__all__ = ["SAMA", "FirstOrder", "first_order", "first_order_indirect_term",
           "optimizer_preconditioned", "finite_difference_mixed_vjp"]


def _nonempty(tree):
    return [t for t in tf.nest.flatten(tree) if t is not None]


def finite_difference_mixed_vjp(inner_loss, params, hparams, vector, eps):
    """(d2 L / dphi dtheta) v by a central difference of d L / d phi along theta +- eps v.

    ``inner_loss(params, hparams) -> scalar``. Error O(eps^2). Cost: 2 gradients with respect
    to ``hparams``, the second pass after the first (one shifted copy of the parameters and
    one pass's activations at a time). Returns a nest shaped like ``hparams`` (None where a
    leaf does not enter).
    """
    def grad_at(sign, after):
        # every op of the pass, the batch's own preprocessing included, waits for ``after``:
        # the executor would otherwise run the work that needs only the batch early and hold
        # its results until the pass runs
        with tf.control_dependencies(after):
            shifted = _tree.tree_axpy(sign * eps, vector, params)
            with tf.GradientTape() as tape:
                tape.watch(tf.nest.flatten(hparams))
                loss = inner_loss(shifted, hparams)
            return tape.gradient(loss, hparams)

    plus = grad_at(1.0, _nonempty(vector))
    minus = grad_at(-1.0, _nonempty(plus))
    return tf.nest.map_structure(
        lambda p, m: None if p is None else (p - m) / (2 * tf.cast(eps, p.dtype)),
        plus, minus, check_types=False)


def optimizer_preconditioned(inner_loss, params, hparams, vector, optimizer, opt_state=None,
                             reduce=None, fuse_update=True):
    """P v = -d theta_new / d grad . v: the Jacobian of one step of ``optimizer`` (an
    `keras_metapt.optim.InnerOptimizer`) with respect to the gradient, at the current inner
    gradient and ``opt_state`` (None: a fresh state), applied to ``vector`` by one JVP of the
    elementwise update. SGD: lr v; Adam: its diagonal preconditioner, including the change of
    the second moment with g (SAMA's adaptive-optimizer correction). Cost: 1 inner gradient
    (computed after ``vector`` is, not beside the pass that makes it) + 1 JVP of the update.

    With ``optimizer.elementwise`` the JVP runs one leaf at a time, each leaf's after the
    previous one's. With ``fuse_update`` (default), inside a traced function, each leaf's JVP
    is one XLA-compiled function (`tf.function(jit_compile=True)`), whose elementwise
    operations XLA fuses into one loop: the update's temporaries (about eight leaf-sized
    tensors for Adam) are never materialised, and the leaf costs one kernel instead of a few
    dozen (one XLA compilation per leaf shape when the enclosing function is traced). On the
    reference MLP of `benchmarks.meta_pt` this, with the passes run in turn, brings the
    first-order hyperstep from 3.0 to 1.6 MiB of tensors held at an unchanged time per plain
    step. Called eagerly it runs plain operations (a function built per call would be
    recompiled at every call). ``fuse_update=False``: plain operations always (for an update
    XLA cannot compile)."""
    # the inner gradient waits for ``vector``: run beside the pass that makes it, it would
    # hold both passes' tensors at once
    with tf.control_dependencies(_nonempty(vector)):
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(params))
            loss = inner_loss(params, hparams)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if reduce is not None:
        grads = reduce(grads)
    state = optimizer.init(params) if opt_state is None else opt_state
    grads = tf.nest.map_structure(tf.stop_gradient, grads)
    flat_p, flat_g, flat_v = (tf.nest.flatten(t) for t in (params, grads, vector))
    if not getattr(optimizer, "elementwise", False):
        with tf.autodiff.ForwardAccumulator(flat_g, flat_v) as acc:
            new_params, _ = optimizer.update(tf.nest.pack_sequence_as(grads, flat_g), state,
                                             params)
        jvp = acc.jvp(tf.nest.flatten(new_params), tf.UnconnectedGradients.ZERO)
        return tf.nest.pack_sequence_as(params, [-j for j in jvp])

    def leaf_jvp(g, v, p, leaf_state):
        with tf.autodiff.ForwardAccumulator(g, v) as acc:
            (new_p,), _ = optimizer.update([g], leaf_state, [p])
        return -acc.jvp(new_p, tf.UnconnectedGradients.ZERO)

    if fuse_update and not tf.executing_eagerly():
        leaf_jvp = tf.function(leaf_jvp, jit_compile=True)
    jvp = []
    for i, (p, g, v) in enumerate(zip(flat_p, flat_g, flat_v)):
        with tf.control_dependencies(jvp[-1:]):  # one leaf at a time
            jvp.append(leaf_jvp(tf.identity(g), v, p, _leaves_state(state, flat_p, [i])))
    return tf.nest.pack_sequence_as(params, jvp)


def _leaves_state(state, flat_params, indices):
    """The state of the leaves ``indices`` alone, for an elementwise optimizer: every part of
    ``state`` whose leaves match ``flat_params`` in number and shape becomes the list of those
    leaves; other leaves (e.g. Adam's step count) are kept. All the leaves: ``state`` itself
    (with one scalar parameter, Adam's scalar step count would otherwise pass for its moment)."""
    if list(indices) == list(range(len(flat_params))):
        return state
    flat = tf.nest.flatten(state)
    if len(flat) == len(flat_params) and all(
            a.shape == b.shape for a, b in zip(flat, flat_params)):
        return [flat[i] for i in indices]
    if isinstance(state, (tuple, list)):
        return type(state)(_leaves_state(part, flat_params, indices) for part in state)
    return state


def first_order_indirect_term(inner_loss, params, hparams, outer_grad, radius=1e-2,
                              optimizer=None, opt_state=None, step_size=None, reduce=None,
                              fuse_update=True):
    """SAMA's first-order stand-in for the IFT indirect term  -M H^-1 g:  -M P g.

    P: the inner optimizer's update Jacobian (`optimizer_preconditioned`) when ``optimizer``
    is given; else ``step_size`` I when given (one Neumann term's H^-1 ~ alpha I); else I.
    M v by `finite_difference_mixed_vjp` with eps = radius / ||v||. ``reduce`` (a cross-replica
    sum) is applied to the inner gradient and once to the finite difference. ``fuse_update``:
    see `optimizer_preconditioned`. Returns a nest shaped like ``hparams`` (None where a leaf
    does not enter). Cost: 2 gradients of L_in with respect to phi (+ 1 inner gradient and 1
    JVP with an optimizer); memory O(P).
    A None leaf of ``outer_grad`` is a zero known in advance: with a diagonal P (an
    elementwise optimizer, step_size I or I) its leaf of P g is zero too, and the whole term
    is computed over the other leaves alone (no gradient, JVP or shifted copy of that leaf);
    with another optimizer it enters as zeros.
    """
    flat_g, flat_p = tf.nest.flatten(outer_grad), tf.nest.flatten(params)
    if any(g is None for g in flat_g):
        if optimizer is not None and not getattr(optimizer, "elementwise", False):
            outer_grad = tf.nest.pack_sequence_as(params, [
                tf.zeros_like(p) if g is None else g for g, p in zip(flat_g, flat_p)])
        else:
            live = [i for i, g in enumerate(flat_g) if g is not None]
            if not live:  # g = 0: no indirect term
                return tf.nest.map_structure(lambda _: None, hparams)

            def live_loss(sub, h):
                full = list(flat_p)
                for j, i in enumerate(live):
                    full[i] = sub[j]
                return inner_loss(tf.nest.pack_sequence_as(params, full), h)
            state = (None if opt_state is None or optimizer is None
                     else _leaves_state(opt_state, flat_p, live))
            return first_order_indirect_term(
                live_loss, [flat_p[i] for i in live], hparams, [flat_g[i] for i in live],
                radius, optimizer, state, step_size, reduce, fuse_update)
    v = outer_grad
    if optimizer is not None:
        v = optimizer_preconditioned(inner_loss, params, hparams, v, optimizer, opt_state,
                                     reduce, fuse_update)
    elif step_size is not None:
        v = tf.nest.map_structure(lambda t: _tree.cast_scalar(step_size, t.dtype) * t, v)
    norm = tf.sqrt(_tree.tree_vdot(v, v))
    eps = radius / tf.maximum(norm, tf.constant(1e-15, norm.dtype))
    mixed = finite_difference_mixed_vjp(inner_loss, params, hparams, v, eps)
    if reduce is not None:
        mixed = reduce(mixed)
    return _tree.tree_map(lambda m: None if m is None else -m, mixed)


class FirstOrder:
    """A ``solve=`` value for `Implicit`, `PTFT` and `MetaPretrainer` that replaces the
    inverse-Hessian solve *and* the mixed VJP by SAMA's first-order passes
    (`first_order_indirect_term`): no HVP, no second-order term. Build with `first_order`.

    Without an optimizer, P = step_size I (the PT learning rate in PTFT / MetaPretrainer, as
    one Neumann term); `with_optimizer(optimizer, opt_state)` makes P that optimizer's update
    Jacobian (MetaPretrainer binds the twin of its Keras PT optimizer and its live state at
    every hyperstep). ``fuse_update``: see `optimizer_preconditioned`.
    """

    def __init__(self, radius=1e-2, optimizer=None, opt_state=None, fuse_update=True):
        if not float(radius) > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.radius, self.fuse_update = float(radius), bool(fuse_update)
        self.optimizer, self.opt_state = optimizer, opt_state

    def with_optimizer(self, optimizer, opt_state):
        return FirstOrder(self.radius, optimizer, opt_state, self.fuse_update)

    def indirect_term(self, inner_loss, params, hparams, outer_grad, step_size=None,
                      reduce=None):
        return first_order_indirect_term(inner_loss, params, hparams, outer_grad, self.radius,
                                         self.optimizer, self.opt_state, step_size, reduce,
                                         self.fuse_update)

    def __repr__(self):
        return f"first_order(radius={self.radius}, fuse_update={self.fuse_update})"


def first_order(radius=1e-2, fuse_update=True):
    """SAMA's first-order hyperstep as a ``solve=`` value (see `FirstOrder`)."""
    return FirstOrder(radius, fuse_update=fuse_update)


class SAMA(_p.Estimator):
    """First-order IFT hypergradient (SAMA): optimizer-Jacobian preconditioner and a
    finite-difference mixed product.

    Args:
      optimizer: the inner `keras_metapt.optim.InnerOptimizer` whose update Jacobian replaces
        H^-1 (pass its state as ``opt_state``; None: a fresh one), or None for P = I.
      radius: the finite-difference step is eps = radius / ||P g|| (SAMA's alpha; default 1e-2).
      fuse_update: each leaf's update JVP as one XLA-compiled function (see
        `optimizer_preconditioned`).
      gradient_reduction, check_finite: see `Estimator`. ``seed`` is ignored; ``opt_state`` is
        returned unchanged.
    """

    def __init__(self, optimizer=None, radius=1e-2, *, fuse_update=True,
                 gradient_reduction=None, check_finite=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        if not float(radius) > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.optimizer, self.fuse_update = optimizer, bool(fuse_update)
        self.radius = float(radius)

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        reduce = self.gradient_reduction
        params, hparams, outer_loss, g_params, direct, inner = _p.at_fixed_point(
            problem, params, hparams, inner_batch, outer_batch, reduce, "SAMA")
        indirect = first_order_indirect_term(inner, params, hparams, g_params, self.radius,
                                             self.optimizer, opt_state, reduce=reduce,
                                             fuse_update=self.fuse_update)
        return self._finish(hparams, direct, indirect, outer_loss, params, opt_state,
                            scale=problem.outer_loss_scale)
