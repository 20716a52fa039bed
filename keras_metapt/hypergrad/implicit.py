"""Implicit-function-theorem hypergradients at an (approximate) inner optimum.

At theta* with grad_theta L_in(theta*, phi) = 0:

    d L_out / d phi = dL_out/dphi  -  (d2 L_in / dphi dtheta) H^-1 dL_out/dtheta
                      (direct)        (indirect)

with H = d2 L_in / dtheta2 at theta*. H^-1 v is approximated by a Neumann series
(Lorraine et al. 2020), by conjugate gradient, or solved exactly for small problems.

Cost: 1 outer gradient + (num_terms | CG iterations | P) HVPs + 1 mixed VJP.
Memory: O(P) (exact: O(P^2)).
"""

from keras_metapt import _tree, linalg
from keras_metapt.hypergrad import problem as _p

__all__ = ["Implicit"]

_SOLVERS = ("neumann", "cg", "exact")


class Implicit:
    """IFT hypergradient estimator.

    Args:
      solver: "neumann", "cg" or "exact" (dense Hessian; small problems only).
      num_terms: Neumann terms i (HVPs).
      alpha: Neumann step; needs alpha * lambda_max(H) < 2. Default 1.0 here;
        the natural choice is the inner learning rate.
      max_iterations, tolerance: CG stopping rule (||r|| <= tolerance * ||b||).
      gradient_reduction: None (one device) or a cross-replica sum
        (`keras_metapt.distribute.replica_sum`) applied to the outer gradients, every HVP and
        the mixed VJP; the losses must then be replica shares of the global-batch means
        (`distribute.shard_fraction`), and the solver loops are traced in Python.
    """

    def __init__(self, solver="cg", num_terms=10, alpha=1.0, max_iterations=10, tolerance=1e-10,
                 gradient_reduction=None):
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.solver = solver
        self.num_terms = int(num_terms)
        self.alpha = alpha
        self.max_iterations = int(max_iterations)
        self.tolerance = tolerance
        self.gradient_reduction = gradient_reduction
        if gradient_reduction is not None and solver == "exact":
            raise ValueError("solver='exact' forms the Hessian on one device; use 'neumann' or "
                             "'cg' with a gradient_reduction")

    def inverse_hvp(self, loss_of_params, params, vector):
        """H^-1 vector with the configured solver, H the Hessian of ``loss_of_params``."""
        if self.solver == "exact":
            return linalg.dense_inverse_hvp(loss_of_params, params, vector)

        reduce = self.gradient_reduction
        unroll = reduce is not None

        def hvp_fn(v):
            h_v = linalg.hvp(loss_of_params, params, v)
            return h_v if reduce is None else reduce(h_v)

        if self.solver == "neumann":
            return linalg.neumann_inverse_hvp(hvp_fn, vector, self.alpha, self.num_terms, unroll)
        return linalg.conjugate_gradient(hvp_fn, vector, self.max_iterations, self.tolerance,
                                         unroll=unroll)

    def __call__(self, problem, params, hparams, inner_batch, outer_batch):
        params, hparams = _p.prepare(params, hparams)
        if isinstance(inner_batch, _p.StepBatches):
            raise ValueError("Implicit takes one inner batch (the Hessian's); got StepBatches")
        reduce = self.gradient_reduction
        outer_loss, g_params, direct = _p.outer_gradients(problem, params, hparams, outer_batch,
                                                          reduce)

        def inner(p, h):
            return _p.inner_loss_value(problem, p, h, inner_batch)

        v = self.inverse_hvp(lambda p: inner(p, hparams), params, g_params)
        mixed = linalg.mixed_vjp(inner, params, hparams, v)
        if reduce is not None:
            mixed = reduce(mixed)
        indirect = _tree.tree_map(lambda m: None if m is None else -m, mixed)
        return _p.finish(hparams, direct, indirect, outer_loss, params, None)
