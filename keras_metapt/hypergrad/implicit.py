"""Implicit-function-theorem hypergradients at an (approximate) inner optimum.

At theta* with grad_theta L_in(theta*, phi) = 0:

    d L_out / d phi = dL_out/dphi  -  (d2 L_in / dphi dtheta) H^-1 dL_out/dtheta
                      (direct)        (indirect: `implicit_indirect_term`)

with H = d2 L_in / dtheta2 at theta*. H^-1 v comes from a `keras_metapt.linalg` solver:
a Neumann series (Lorraine et al. 2020), conjugate gradient, or the exact dense solve.

Cost: 1 outer gradient + the solver's HVPs (num_terms | CG iterations | P) + 1 mixed VJP.
Memory: O(P) (dense: O(P^2)).
"""

from keras_metapt import _tree, linalg
from keras_metapt.hypergrad import problem as _p

__all__ = ["Implicit", "implicit_indirect_term"]


def implicit_indirect_term(inner_loss, params, hparams, outer_grad, solve, step_size=None,
                           reduce=None, hvp_mode="reverse_over_reverse"):
    """The IFT indirect term  - (d2 L_in / dphi dtheta) H^-1 g,  H = d2 L_in / dtheta2.

    ``inner_loss(params, hparams) -> scalar``; ``outer_grad`` g is shaped like ``params``;
    ``solve`` is a `keras_metapt.linalg` solver, given ``step_size`` (for
    `linalg.neumann(alpha=None)`), or `hypergrad.first_order(...)`, which replaces solve and
    mixed VJP by first-order passes. ``reduce`` (a cross-replica sum) is applied to every HVP and
    to the mixed VJP, and the solver then traces its iterations in Python. ``hvp_mode``:
    `linalg.hvp`'s mode (reverse-over-reverse or forward-over-reverse). Returns a nest
    shaped like ``hparams`` with None where a leaf does not enter the inner gradient.
    Cost: the solver's HVPs + 1 mixed VJP. Memory: O(P) beyond the solver's.
    """

    if hasattr(solve, "indirect_term"):  # a first-order value (`hypergrad.first_order`)
        return solve.indirect_term(inner_loss, params, hparams, outer_grad, step_size, reduce)

    def hvp_fn(v):
        h_v = linalg.hvp(lambda p: inner_loss(p, hparams), params, v, hvp_mode)
        return h_v if reduce is None else reduce(h_v)

    v = solve(hvp_fn, outer_grad, step_size=step_size, unroll=reduce is not None)
    mixed = linalg.mixed_vjp(inner_loss, params, hparams, v)
    if reduce is not None:
        mixed = reduce(mixed)
    return _tree.tree_map(lambda m: None if m is None else -m, mixed)


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
                                          problem.inner_learning_rate, reduce, self.hvp_mode)
        return self._finish(hparams, direct, indirect, outer_loss, params, opt_state,
                            scale=problem.outer_loss_scale)
