"""Implicit-function-theorem hypergradients at an (approximate) inner optimum.

At theta* with grad_theta L_in(theta*, phi) = 0:

    d L_out / d phi = dL_out/dphi  -  (d2 L_in / dphi dtheta) H^-1 dL_out/dtheta
                      (direct)        (indirect: `implicit_indirect_term`)

with H = d2 L_in / dtheta2 at theta*. H^-1 v comes from a `keras_metapt.linalg` solver:
a Neumann series (Lorraine et al. 2020), conjugate gradient, or the exact dense solve.

Cost: 1 outer gradient + the solver's HVPs (num_terms | CG iterations | P) + 1 mixed VJP.
Memory: O(P) (dense: O(P^2)).
"""

import tensorflow as tf

from keras_metapt import _tree, linalg
from keras_metapt.hypergrad import problem as _p

__all__ = ["Implicit", "implicit_indirect_term"]


def implicit_indirect_term(inner_loss, params, hparams, outer_grad, solve, step_size=None,
                           reduce=None, hvp_mode="reverse_over_reverse",
                           rescale_products=False):
    """The IFT indirect term  - (d2 L_in / dphi dtheta) H^-1 g,  H = d2 L_in / dtheta2.

    ``inner_loss(params, hparams) -> scalar``; ``outer_grad`` g is shaped like ``params``;
    ``solve`` is a `keras_metapt.linalg` solver, given ``step_size`` (for
    `linalg.neumann(alpha=None)`), or `hypergrad.first_order(...)`, which replaces solve and
    mixed VJP by first-order passes. ``reduce`` (a cross-replica sum) is applied to every HVP and
    to the mixed VJP, and the solver then traces its iterations in Python. ``hvp_mode``:
    `linalg.hvp`'s mode (reverse-over-reverse or forward-over-reverse).
    ``rescale_products`` (for a loss-scaled float16 problem): every HVP and the mixed VJP
    are taken on v rescaled to the norm of ``outer_grad`` and scaled back (`scaled_product`),
    so the half-precision products inside the network are as large as the scaled outer
    gradient, which the loss scale keeps in range, whatever the solver made of v (CG grows
    it by up to 1/lambda_min). Returns a nest
    shaped like ``hparams`` with None where a leaf does not enter the inner gradient.
    Cost: the solver's HVPs + 1 mixed VJP (with ``rescale_products``, each also one norm
    and two P-sized rescalings). Memory: O(P) beyond the solver's.
    """

    if hasattr(solve, "indirect_term"):  # a first-order value (`hypergrad.first_order`)
        return solve.indirect_term(inner_loss, params, hparams, outer_grad, step_size, reduce)

    norm = tf.sqrt(_tree.tree_vdot(outer_grad, outer_grad)) if rescale_products else None

    def hvp_fn(v):
        h_v = scaled_product(
            lambda u: linalg.hvp(lambda p: inner_loss(p, hparams), params, u, hvp_mode), v,
            norm)
        return h_v if reduce is None else reduce(h_v)

    v = solve(hvp_fn, outer_grad, step_size=step_size, unroll=reduce is not None)
    mixed = scaled_product(lambda u: linalg.mixed_vjp(inner_loss, params, hparams, u), v,
                           norm)
    if reduce is not None:
        mixed = reduce(mixed)
    return _tree.tree_map(lambda m: None if m is None else -m, mixed)


def scaled_product(linear_fn, v, norm=None):
    """linear_fn(v) for a map linear in v (an HVP, a mixed VJP), taken as
    (||v|| / N) linear_fn(v N / ||v||) when a norm N is given (``linear_fn(v)`` when None).

    Equal in exact arithmetic; in float16 the products inside the network then see a vector
    of norm N whatever the solver made of v. The rescaling is done in v's dtype (float32
    master weights); where v or N is 0 the map takes v as it is. Cost: the map, one norm of
    v and two P-sized rescalings (of v and of the result).
    """
    if norm is None:
        return linear_fn(v)
    size = tf.sqrt(_tree.tree_vdot(v, v))
    norm = tf.cast(norm, size.dtype)
    factor = tf.where((size > 0) & (norm > 0), norm / tf.where(size > 0, size, 1.0), 1.0)
    out = linear_fn(_tree.tree_map(lambda x: x * tf.cast(factor, x.dtype), v))
    return _tree.tree_map(lambda y: None if y is None else y / tf.cast(factor, y.dtype), out)


def check_solver(solve):
    """Raises a ValueError naming the accepted values unless ``solve`` is a solver."""
    if hasattr(solve, "indirect_term"):
        return solve
    if isinstance(solve, str) or not callable(solve):
        raise ValueError(
            f"solve must be a linear solver such as linalg.neumann(5), linalg.cg(10) or "
            f"linalg.dense(), or hypergrad.first_order(), got {solve!r} (solver names are not "
            "accepted)")
    return solve


def check_hvp_mode(mode):
    if mode not in linalg.HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {linalg.HVP_MODES}, got {mode!r}")
    return mode


class Implicit(_p.Estimator):
    """IFT hypergradient estimator.

    Args:
      solve: a `keras_metapt.linalg` solver (default ``linalg.cg(10)``):
        ``linalg.neumann(num_terms, alpha)`` (needs alpha * lambda_max(H) < 2; alpha=None
        takes ``problem.inner_learning_rate``), ``linalg.cg(max_iterations, tolerance)``
        or ``linalg.dense()`` (forms the Hessian; small problems only).
      gradient_reduction: None (one device) or a cross-replica sum
        (`keras_metapt.distribute.replica_sum`) applied to the outer gradients, every HVP and
        the mixed VJP; the losses must then be replica shares of the global-batch means
        (`distribute.shard_fraction`), and the solver loops are traced in Python.
      hvp_mode: "reverse_over_reverse" (default) or "forward_over_reverse" (`linalg.hvp`).
      check_finite: see `Estimator`. ``opt_state`` is returned unchanged; ``seed`` is ignored.
    """

    def __init__(self, solve=linalg.cg(10), hvp_mode="reverse_over_reverse", *,
                 gradient_reduction=None, check_finite=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        self.solve = check_solver(solve)
        self.hvp_mode = check_hvp_mode(hvp_mode)

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        reduce = self.gradient_reduction
        params, hparams, outer_loss, g_params, direct, inner = _p.at_fixed_point(
            problem, params, hparams, inner_batch, outer_batch, reduce, "Implicit")
        indirect = implicit_indirect_term(inner, params, hparams, g_params, self.solve,
                                          problem.inner_learning_rate, reduce, self.hvp_mode,
                                          rescale_products=problem.outer_loss_scale is not None)
        return self._finish(hparams, direct, indirect, outer_loss, params, opt_state,
                            scale=problem.outer_loss_scale)
