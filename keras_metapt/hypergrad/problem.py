"""The problem types, the result type and the base class of every estimator.

A bilevel problem is two pure losses of (params, hparams, batch):

    inner_loss(theta, phi, batch)  -> scalar   (training / pre-training loss)
    outer_loss(theta, phi, batch)  -> scalar   (validation / fine-tuning loss)

Every estimator follows the protocol of `Estimator` (written out in
`keras_metapt.hypergrad`'s docstring) and returns a `HypergradResult` whose ``hypergrad``
= ``direct`` + ``indirect``: the direct term d outer / d phi at fixed theta, and the
indirect term through the inner problem's dependence of theta on phi.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from keras_metapt import _checks, _tree, functional
from keras_metapt.errors import InputMismatchError, NonFiniteHypergradientError

__all__ = ["BilevelProblem", "StepBatches", "HypergradResult", "ensure_finite", "Estimator",
           "train_inner"]


@dataclasses.dataclass(frozen=True)
class BilevelProblem:
    """Inner and outer losses, and optionally how hparams set optimizer hyperparameters.

    ``inner_optimizer_hparams(hparams, step, num_steps) -> dict`` returns overrides
    for the inner optimizer at a given step (a scalar int tensor), for example
    ``{"learning_rate": piecewise_constant(hparams["lr"], step, num_steps)}``.
    Used by the estimators that differentiate through optimizer steps.

    ``inner_learning_rate`` (optional, a float or scalar tensor) is the inner optimizer's
    step size; `Implicit` hands it to its solver, where `linalg.neumann(alpha=None)` uses it.

    ``inner_loss_at_points(points, hparams, batch) -> [K]`` (optional) is the inner loss at K
    parameter points at once, ``points`` a list of K params nests; `EvoGrad` calls it, when
    given, for its K copies instead of ``inner_loss`` once per copy, so that the losses of
    one copy may depend on the others (a Meta-Weight-Net that weighs every copy at the mean
    of the copies' per-example losses, `reweighting.MetaWeightNetTrainer`). Every other
    estimator uses ``inner_loss``.

    ``outer_loss_scale`` (optional, S > 0: a float or scalar tensor; None for 1) is loss
    scaling for losses computed in float16. The estimators differentiate S * outer_loss, so
    the outer gradient and everything computed from it (an unroll's backward pass, the
    tangent products, a Neumann/CG solve, the mixed VJP) are S times larger, away from
    float16's underflow, and they divide S out of ``direct`` and ``indirect`` at the end, in
    the hparams' dtype. The hypergradient is linear in the outer gradient, so it is unchanged
    but for rounding; ``outer_loss`` is reported unscaled. Too large an S overflows to a
    non-finite hypergradient: with a dynamic scale call the estimator with
    ``check_finite=False`` and move S by `next_loss_scale`. `HyperDistill` refuses it (its
    fitted scale mixes calls).
    """

    inner_loss: Callable[[Any, Any, Any], tf.Tensor]
    outer_loss: Callable[[Any, Any, Any], tf.Tensor]
    inner_optimizer_hparams: Optional[Callable[[Any, tf.Tensor, int], dict]] = None
    inner_learning_rate: Any = None
    outer_loss_scale: Any = None
    inner_loss_at_points: Optional[Callable[[Any, Any, Any], tf.Tensor]] = None

    def __post_init__(self):
        scale = self.outer_loss_scale
        if isinstance(scale, (int, float)) and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"outer_loss_scale must be a finite number > 0 (or None), got "
                             f"{scale!r}")


class StepBatches:
    """One inner batch per step: every tensor has a leading dimension of length >= T.

    Pass ``StepBatches(batches)`` as ``inner_batch`` to use ``batches[t]`` at step t
    (gathered inside the loop, so it compiles with XLA). Any other ``inner_batch``
    is reused at every step.
    """

    def __init__(self, batches):
        self.batches = batches

    def length(self):
        lengths = {x.shape[0] for x in tf.nest.flatten(self.batches)}
        if len(lengths) != 1:
            raise InputMismatchError(
                f"StepBatches tensors disagree on their leading (step) dimension: {sorted(lengths)}")
        return lengths.pop()

    def at(self, step):
        return tf.nest.map_structure(lambda x: tf.gather(x, step), self.batches)


class HypergradResult(NamedTuple):
    """What every estimator returns.

    hypergrad: d outer / d hparams (shaped like hparams) = direct + indirect.
    direct:    the partial derivative at fixed inner parameters.
    indirect:  the part through the inner parameters' dependence on hparams.
    outer_loss: the outer loss at ``params``.
    params:    inner parameters at which the outer loss was taken (after the
               inner steps for unrolled/forward; the given ones for implicit;
               the softmax-weighted combination for EvoGrad).
    opt_state: inner optimizer state after the steps (None where no steps ran).
    is_finite: scalar bool, every hypergradient element is finite. Check it (or
               call `ensure_finite`) after a `jit_compile=True` function, where
               XLA drops runtime assertions.
    """

    hypergrad: Any
    direct: Any
    indirect: Any
    outer_loss: tf.Tensor
    params: Any
    opt_state: Any
    is_finite: tf.Tensor


def ensure_finite(result, hparams_names_from=None):
    """Raises NonFiniteHypergradientError if ``result.is_finite`` is False (eager only).

    Use after calling an estimator inside ``tf.function(jit_compile=True)``, where
    XLA cannot raise from inside the compiled program.
    """
    if not bool(result.is_finite):
        names = _tree.leaf_names(result.hypergrad, "hparams")
        bad = [name for name, leaf in zip(names, tf.nest.flatten(result.hypergrad))
               if not bool(tf.reduce_all(tf.math.is_finite(leaf)))]
        raise NonFiniteHypergradientError(
            f"the hypergradient for {', '.join(bad)} is not finite (NaN or Inf); no update "
            "should be applied. Lower the learning rates, check the losses, or use float64.")
    return result


class Estimator:
    """The protocol every hypergradient estimator follows (subclassed by all of them).

    Construction: ``Estimator(<method settings>, *, gradient_reduction=None,
    check_finite=True)``.
      gradient_reduction: None (one device) or a nest -> nest cross-replica sum
        (`keras_metapt.distribute.replica_sum`); the losses must then be replica shares of
        the global-batch means (`distribute.shard_fraction`). An estimator that cannot work
        across replicas refuses it with a ValueError naming the alternative.
      check_finite: raise `NonFiniteHypergradientError` on a NaN/Inf hypergradient (eagerly;
        in a graph through check_numerics). False only reports it in ``is_finite``.

    Call: ``estimator(problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
    seed=None) -> HypergradResult``.
      opt_state: inner optimizer state to continue from (None: a fresh one); estimators that
        run no optimizer steps return it unchanged.
      seed: shape-[2] integer tensor for stochastic estimators (the same draw for the same
        seed); deterministic estimators accept and ignore it.
    """

    def __init__(self, *, gradient_reduction=None, check_finite=True):
        if gradient_reduction is not None and not callable(gradient_reduction):
            raise TypeError("gradient_reduction must be None or a callable nest -> nest (e.g. "
                            f"keras_metapt.distribute.replica_sum), got {gradient_reduction!r}")
        self.gradient_reduction = gradient_reduction
        self.check_finite = bool(check_finite)

    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        raise NotImplementedError

    def _finish(self, hparams, direct, indirect, outer_loss, params, opt_state, scale=None):
        return finish(hparams, direct, indirect, outer_loss, params, opt_state,
                      check_finite=self.check_finite, scale=scale)


# ---------------------------------------------------------------------------
# Helpers shared by the estimator modules (not public).

def batch_arrays(batch):
    """The batch nest with every `StepBatches` replaced by its tensors (for naming leaves)."""
    return tf.nest.map_structure(lambda x: x.batches if isinstance(x, StepBatches) else x, batch)


def names_shape_errors(call):
    """Decorates an estimator's ``__call__``: a TensorFlow shape error anywhere in the call
    (one not already named by the loss that raised it) becomes `InputMismatchError` naming the
    leaves of params, hparams and batches whose shapes TensorFlow reports; the call runs inside
    `functional.exact_batch_moments` (exact second derivatives through batch statistics)."""

    @functools.wraps(call)
    def wrapper(self, problem, params, hparams, inner_batch, outer_batch, **kwargs):
        named = {"hparams": hparams, "params": params, "inner_batch": batch_arrays(inner_batch),
                 "outer_batch": batch_arrays(outer_batch)}
        with _checks.naming_shape_errors(f"{type(self).__name__} (computing the hypergradient)",
                                         named), functional.exact_batch_moments():
            return call(self, problem, params, hparams, inner_batch, outer_batch, **kwargs)

    return wrapper


def prepare(params, hparams, inner_batch=None, num_steps=None):
    """Validates and converts inputs; returns (params, hparams) as tensor nests."""
    params = _tree.to_tensors(params)
    hparams = _tree.to_tensors(hparams)
    dtype = _checks.check_float_leaves(params, "params")
    _checks.check_float_leaves(hparams, "hparams", dtype)
    if isinstance(inner_batch, StepBatches) and num_steps is not None:
        length = inner_batch.length()
        if length is not None and length < num_steps:
            raise InputMismatchError(
                f"StepBatches has {length} batches but the estimator runs {num_steps} steps")
    return params, hparams


def batch_at(inner_batch, step):
    return inner_batch.at(step) if isinstance(inner_batch, StepBatches) else inner_batch


def loss_value(what, loss_fn, named, *args):
    """``loss_fn(*args)`` checked to be a scalar; a shape error inside it is re-raised naming
    ``what`` and the leaves of ``named`` (prefix -> nest) of the shapes TensorFlow reports."""
    with _checks.naming_shape_errors(what, named):
        value = loss_fn(*args)
    return _checks.check_scalar(value, what)


def inner_loss_value(problem, params, hparams, batch):
    return loss_value("inner_loss", problem.inner_loss,
                      {"hparams": hparams, "params": params, "inner_batch": batch},
                      params, hparams, batch)


def inner_loss_values_at_points(problem, points, hparams, batch):
    """The inner loss at each of the params nests ``points``: a [K] tensor, from
    ``problem.inner_loss_at_points`` when given (its shape checked), else ``inner_loss`` once
    per point."""
    if problem.inner_loss_at_points is None:
        return tf.stack([inner_loss_value(problem, p, hparams, batch) for p in points])
    with _checks.naming_shape_errors("inner_loss_at_points",
                                     {"hparams": hparams, "params": points[0],
                                      "inner_batch": batch}):
        values = tf.convert_to_tensor(problem.inner_loss_at_points(points, hparams, batch))
    if not values.shape.is_compatible_with([len(points)]):
        raise InputMismatchError(f"inner_loss_at_points must return one loss per point, a "
                                 f"[{len(points)}] tensor; got shape {values.shape}")
    if not values.dtype.is_floating:
        raise InputMismatchError(f"inner_loss_at_points must return floating losses, got "
                                 f"{values.dtype.name}")
    return values


def outer_loss_value(problem, params, hparams, batch):
    return loss_value("outer_loss", problem.outer_loss,
                      {"hparams": hparams, "params": params, "outer_batch": batch},
                      params, hparams, batch)


def inner_step(problem, optimizer, params, opt_state, hparams, inner_batch, step, num_steps,
               reduce=None):
    """One differentiable optimizer step on the inner loss at step index ``step``.

    ``reduce`` (e.g. `distribute.replica_sum`) is applied to the gradients before the update.
    """
    batch = batch_at(inner_batch, step)
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(params))
        loss = inner_loss_value(problem, params, hparams, batch)
    grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if reduce is not None:
        grads = reduce(grads)
    overrides = {}
    if problem.inner_optimizer_hparams is not None:
        overrides = problem.inner_optimizer_hparams(hparams, step, num_steps)
    return optimizer.update(grads, opt_state, params, **overrides)


def run_inner_steps(problem, optimizer, params, opt_state, hparams, inner_batch, start, stop,
                    num_steps, reduce=None):
    """Steps ``start`` .. ``stop``-1 in a `tf.while_loop` (differentiable).

    With a gradient ``reduce`` (a cross-replica sum) the steps are traced in Python instead,
    since strategies forbid all-reduces inside loops. A single step is traced without a loop:
    the same ops, and its second-order gradient avoids TensorFlow 2.21's failure on deep
    networks ("AlreadyExistsError ... AddN/tmp_var" from the second execution of a while
    loop's gradient of a gradient, seen on ResNet-18/34 one-step look-aheads).
    """
    if stop <= start:
        return params, opt_state
    if stop - start == 1 and reduce is None:
        return inner_step(problem, optimizer, params, opt_state, hparams, inner_batch,
                          tf.constant(start), num_steps)
    if reduce is not None:
        for t in range(start, stop):
            params, opt_state = inner_step(problem, optimizer, params, opt_state, hparams,
                                           inner_batch, t, num_steps, reduce)
        return params, opt_state

    def body(t, params, opt_state):
        params, opt_state = inner_step(problem, optimizer, params, opt_state, hparams,
                                       inner_batch, t, num_steps)
        return t + 1, params, opt_state

    _, params, opt_state = tf.while_loop(
        lambda t, p, s: t < stop, body, (tf.constant(start), params, opt_state),
        maximum_iterations=stop - start)
    return params, opt_state


def train_inner(problem, optimizer, params, hparams, inner_batch, num_steps, *, opt_state=None,
                start=0):
    """The inner problem's steps ``start`` .. ``num_steps`` - 1, not differentiated: the training
    run whose hypergradient the estimators take (same batches, same optimizer overrides at each
    step index). Returns (params, opt_state). One gradient per step, O(P) memory."""
    params, hparams = prepare(params, hparams, inner_batch, num_steps)
    if opt_state is None:
        opt_state = optimizer.init(params)
    params, opt_state = run_inner_steps(problem, optimizer, params, opt_state, hparams,
                                        inner_batch, int(start), int(num_steps), int(num_steps))
    return (tf.nest.map_structure(tf.stop_gradient, params),
            tf.nest.map_structure(tf.stop_gradient, opt_state))


def outer_gradients(problem, params, hparams, outer_batch, reduce=None):
    """(outer loss, S d outer/d params, S direct d outer/d hparams), S the problem's
    ``outer_loss_scale`` (1 when None; the loss itself is returned unscaled).

    The direct term keeps None where a hyperparameter does not enter the outer loss.
    ``reduce`` (a cross-replica sum) is applied to all three.
    """
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(params) + tf.nest.flatten(hparams))
        loss = outer_loss_value(problem, params, hparams, outer_batch)
        scaled = loss
        if getattr(problem, "outer_loss_scale", None) is not None:  # recorded: S * loss
            scaled = loss * tf.cast(problem.outer_loss_scale, loss.dtype)
    g_params, direct = tape.gradient(scaled, (params, hparams))
    if reduce is not None:
        loss, g_params, direct = reduce((loss, g_params, direct))
    return loss, _tree.zeros_for_none(g_params, params), direct


def at_fixed_point(problem, params, hparams, inner_batch, outer_batch, reduce, estimator):
    """The shared start of the estimators that work at the given inner point (Implicit, SAMA):
    validated (params, hparams), the outer loss and gradients (reduced), and the inner loss as
    a function ``inner(params, hparams)`` of the one inner batch."""
    params, hparams = prepare(params, hparams)
    if isinstance(inner_batch, StepBatches):
        raise ValueError(f"{estimator} takes one inner batch (the Hessian's); got StepBatches")
    outer_loss, g_params, direct = outer_gradients(problem, params, hparams, outer_batch, reduce)

    def inner(p, h):
        return inner_loss_value(problem, p, h, inner_batch)

    return params, hparams, outer_loss, g_params, direct, inner


def divide_out_scale(x, scale):
    """x / S, divided in float32 (float64 for a float64 x) and cast back to x's dtype.

    A float16 leaf is not divided in float16: S >= 65520 is inf there, and x / inf would be
    a silent, finite 0. O(size of x)."""
    wide = tf.float64 if x.dtype == tf.float64 else tf.float32
    return tf.cast(tf.cast(x, wide) / tf.cast(scale, wide), x.dtype)


def finish(hparams, direct, indirect, outer_loss, params, opt_state, check_finite=True,
           scale=None):
    """Checks connection, shapes (each leaf's exactly) and finiteness, assembles the
    HypergradResult; ``scale`` (S, the problem's ``outer_loss_scale``, or None) is divided out
    of ``direct`` and ``indirect`` (computed from S * outer loss).

    With ``check_finite=False`` a non-finite hypergradient is only reported through
    ``is_finite`` (for callers that skip the update themselves).

    ``direct`` and ``indirect`` may hold None for a leaf; a leaf for which both are
    None does not influence the outer loss at all, which is an error.
    """
    connected = tf.nest.map_structure(
        lambda d, i: None if (d is None and i is None) else True, direct, indirect)
    _checks.check_connected(connected, hparams, "hparams",
                            "the outer loss (neither directly nor through the inner problem)")
    _checks.check_shapes_like(direct, hparams, "hparams", "direct term of the hypergradient")
    _checks.check_shapes_like(indirect, hparams, "hparams", "indirect term of the hypergradient")
    indirect = _tree.zeros_for_none(indirect, hparams)
    direct = _tree.zeros_for_none(direct, hparams)
    if scale is not None:
        indirect, direct = tf.nest.map_structure(lambda x: divide_out_scale(x, scale),
                                                 (indirect, direct))
    total = _tree.tree_add(direct, indirect)
    if check_finite:
        total = _checks.check_finite(total, "hparams")
    return HypergradResult(total, direct, indirect, outer_loss, params, opt_state,
                           _checks.finite_flag(total))
