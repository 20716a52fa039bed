"""The PT/FT hypergradient of "Meta-learning to Improve Pre-training" (Raghu et al. 2021).

Parameters: theta_P = (theta_E encoder, theta_H PT head), psi = FT head, phi = meta-parameters.
Objective: min_phi L_FT_val(FT(theta_P*(phi))), theta_P*(phi) = argmin L_PT(theta_P, phi).

One hypergradient:
  a. FT stage, unrolled: psi_0 = psi; K differentiable optimizer steps
       psi_{k+1} = U(psi_k, grad_psi L_FT(theta_E, psi_k; MetaTrain_k))
     with the encoder features attached, then
       g_FT = d L_FT(theta_E, psi_K; MetaVal) / d theta_E         (through the K steps)
  b. PT stage, implicit: v ~ H^-1 [g_FT; 0], H = d2 L_PT / d theta_P2 on a fresh PT batch
     (Neumann: alpha sum_{j<=i} (I - alpha H)^j, or CG), and
       hypergradient = - d <d L_PT(theta_P, phi) / d theta_P, v> / d phi     (no direct term)

The psi blocks of the Hessian and of d L_PT/d[theta_P, psi] are zero (L_PT does not depend on
psi), so the solve runs over theta_P only; this is the same quantity as the formula over
[theta_P, psi].

Cost: K FT gradients + 1 backward through them (second order in theta_E), plus i HVPs of L_PT
(or CG iterations) and 1 mixed VJP. Memory: O(P + K * P_psi).
"""

import dataclasses
from typing import Any, Callable

import tensorflow as tf

from keras_metapt import _checks, _tree, linalg
from keras_metapt.errors import InputMismatchError
from keras_metapt.hypergrad import problem as _p

__all__ = ["PretrainFinetuneProblem", "PTFT"]


@dataclasses.dataclass(frozen=True)
class PretrainFinetuneProblem:
    """Pure losses of the two stages.

    pt_loss(theta_E, theta_H, phi, batch) -> scalar   (pre-training loss, shaped by phi)
    ft_loss(theta_E, psi, batch) -> scalar             (fine-tuning loss of the FT head)
    """

    pt_loss: Callable[[Any, Any, Any, Any], tf.Tensor]
    ft_loss: Callable[[Any, Any, Any], tf.Tensor]


def _identity(tree):
    return tree


class PTFT:
    """PT/FT hypergradient estimator (implicit over PT, unrolled over K FT-head steps).

    Called as ``PTFT(...)(problem, (theta_E, theta_H, psi), phi, pt_batch,
    (meta_train, meta_val), opt_state=None)``; ``meta_train`` is one batch used for every FT
    step or `StepBatches` with K batches. Returns a `HypergradResult` whose ``params`` are
    (theta_E, theta_H, psi_K), ``opt_state`` the FT optimizer state after the K steps, and
    ``outer_loss`` the MetaVal loss at psi_K.

    Args:
      ft_optimizer: differentiable `InnerOptimizer` for the FT unroll.
      unroll_steps: K >= 1.
      solver: "neumann" (default, Raghu et al.) or "cg".
      num_terms: Neumann terms i (HVPs); default 1.
      alpha: Neumann step; the PT learning rate in Raghu et al.
      max_iterations, tolerance: CG stopping rule.
      gradient_reduction: None (one device) or a nest -> nest sum over replicas
        (`keras_metapt.distribute.replica_sum`). With it, the losses must be the replica's
        share of the global-batch mean (`distribute.shard_fraction`); every FT gradient, g_FT,
        HVP and the mixed VJP is reduced, so the result equals the single-device one on the
        global batches, on every replica; the loops are then traced in Python.
      check_finite: raise NonFiniteHypergradientError on NaN/Inf (eagerly; in a graph through
        check_numerics). False only reports it in ``is_finite``, for callers that skip the
        update themselves (MetaPretrainer does, then stops fit with that error).
    """

    def __init__(self, ft_optimizer, unroll_steps=1, solver="neumann", num_terms=1, alpha=1e-3,
                 max_iterations=10, tolerance=1e-10, check_finite=True, gradient_reduction=None):
        if int(unroll_steps) < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        if solver not in ("neumann", "cg"):
            raise ValueError(f"solver must be 'neumann' or 'cg', got {solver!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.ft_optimizer = ft_optimizer
        self.unroll_steps = int(unroll_steps)
        self.solver = solver
        self.num_terms = int(num_terms)
        self.alpha = alpha
        self.max_iterations = int(max_iterations)
        self.tolerance = tolerance
        self.check_finite = bool(check_finite)
        self.gradient_reduction = gradient_reduction

    def __call__(self, problem, params, hparams, inner_batch, outer_batch, opt_state=None):
        theta_e, theta_h, psi = params
        meta_train, meta_val = outer_batch
        theta_p = (_tree.to_tensors(theta_e), _tree.to_tensors(theta_h))
        theta_p, hparams = _p.prepare(theta_p, hparams)
        psi, _ = _p.prepare(psi, hparams)
        theta_e, theta_h = theta_p
        K = self.unroll_steps
        reduce = self.gradient_reduction
        unroll = reduce is not None
        if reduce is None:
            reduce = _identity
        if isinstance(meta_train, _p.StepBatches):
            length = meta_train.length()
            if length is not None and length < K:
                raise InputMismatchError(
                    f"meta_train has {length} batches for unroll_steps={K}")
        if opt_state is None:
            opt_state = self.ft_optimizer.init(psi)

        # a. FT unroll: an inner problem over psi whose "hyperparameters" are theta_E.
        ft_inner = _p.BilevelProblem(inner_loss=lambda s, e, b: problem.ft_loss(e, s, b),
                                     outer_loss=lambda s, e, b: problem.ft_loss(e, s, b))
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(theta_e))
            psi_k, opt_state_k = _p.run_inner_steps(ft_inner, self.ft_optimizer, psi, opt_state,
                                                    theta_e, meta_train, 0, K, K,
                                                    self.gradient_reduction)
            val_loss = _checks.check_scalar(problem.ft_loss(theta_e, psi_k, meta_val), "ft_loss")
        g_ft = reduce(tape.gradient(val_loss, theta_e,
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO))
        val_loss = reduce(val_loss)

        # b. PT stage: v ~ H^-1 [g_FT; 0] over theta_P, then - d <grad L_PT, v> / d phi.
        def pt_of(tp, phi):
            return _checks.check_scalar(problem.pt_loss(tp[0], tp[1], phi, inner_batch), "pt_loss")

        rhs = (g_ft, _tree.tree_zeros_like(theta_h))

        def hvp_fn(v):
            return reduce(linalg.hvp(lambda tp: pt_of(tp, hparams), theta_p, v))

        if self.solver == "neumann":
            v = linalg.neumann_inverse_hvp(hvp_fn, rhs, self.alpha, self.num_terms, unroll)
        else:
            v = linalg.conjugate_gradient(hvp_fn, rhs, self.max_iterations, self.tolerance,
                                          unroll=unroll)
        mixed = reduce(linalg.mixed_vjp(pt_of, theta_p, hparams, v))
        indirect = _tree.tree_map(lambda m: None if m is None else -m, mixed)
        no_direct_term = tf.nest.map_structure(lambda _: None, hparams)
        return _p.finish(hparams, no_direct_term, indirect, val_loss, (theta_e, theta_h, _tree.tree_stop_gradient(psi_k)),
                         _tree.tree_stop_gradient(opt_state_k), check_finite=self.check_finite)
