"""How a hypergradient is computed: estimators, one module each, one protocol.

(What is learned, the layers whose weights are phi, lives in `keras_metapt.hyper`.)

The protocol, followed by every estimator (base class `Estimator`):

    estimator = Estimator(<method settings>, *, gradient_reduction=None, check_finite=True)
    result = estimator(problem, params, hparams, inner_batch, outer_batch, *,
                       opt_state=None, seed=None)            # -> HypergradResult

- problem: `BilevelProblem(inner_loss, outer_loss, ...)`; PTFT takes a
  `PretrainFinetuneProblem`, whose ``params`` are `PTFTParams(encoder, pt_head, ft_head)` and
  whose ``outer_batch`` is `FinetuneBatches(train, val)`; phi is always ``hparams``.
- inner_batch: one batch, or `StepBatches` (one per inner step) for estimators that step.
- gradient_reduction: a cross-replica sum (`distribute.replica_sum`) to run data-parallel;
  `Forward`, `Reversible` and `HyperDistill` refuse it (ValueError naming the alternatives).
- check_finite: raise on a NaN/Inf hypergradient; False only reports ``result.is_finite``.
- opt_state: inner optimizer state to continue from; returned unchanged where no steps run.
- seed: shape-[2] int tensor for the stochastic `EvoGrad`; ignored by the others.
- float16 losses: ``BilevelProblem(outer_loss_scale=S)`` (the estimators differentiate
  S * outer loss and divide S out at the end) with `next_loss_scale` for a dynamic S.
- `SAMA` is the first-order member: no HVP, the optimizer's update Jacobian for H^-1 and a
  finite-difference mixed product; `first_order(radius)` is the same as a ``solve=`` value
  for `Implicit`, `PTFT` and `MetaPretrainer` (it replaces solve and mixed VJP together).
- `compile_hypergradient(estimator, problem)`: the call traced once per argument signature
  and run with its flat tensors, for loops of many cheap calls (tf.function's per-call
  argument matching costs about 0.5 ms on 11 tensors; this path tens of microseconds).
- Implicit solves go through one solver protocol, ``solve(hvp_fn, b, *, step_size, unroll)``
  (`keras_metapt.linalg.neumann`, `cg`, `dense`), and one IFT helper,
  `implicit_indirect_term`, shared by `Implicit` and `PTFT`.

| estimator | cost per call                                | memory            |
|-----------|----------------------------------------------|-------------------|
| Unrolled  | T gradients + ~2 per differentiated step      | O(K * P)          |
| Forward   | n_phi JVPs per step, T steps                  | O(P * n_phi)      |
| Implicit  | 1 outer gradient + solver HVPs + 1 mixed VJP  | O(P)              |
| EvoGrad   | K forwards + 1 backward, first order          | O(K * P)          |
| PTFT      | K FT steps + solver HVPs + 1 mixed VJP        | O(P + K * P_psi)  |
| SAMA      | 1 outer + 2 first-order gradients (+1, +1 JVP) | O(P)             |
| Reversible | T gradients forward, T gradient VJPs back (exact) | O(P) + ~log2(1/gamma) bits/weight/step |
| HyperDistill | online, per step: 1 step + 1 outer gradient + 1 step VJP (+ a reference every N steps) | O(P) |
"""

from keras_metapt.hypergrad.compiled import CompiledHypergradient, compile_hypergradient
from keras_metapt.hypergrad.evograd import EvoGrad
from keras_metapt.hypergrad.forward import Forward
from keras_metapt.hypergrad.hyperdistill import HyperDistill
from keras_metapt.hypergrad.implicit import Implicit, implicit_indirect_term
from keras_metapt.hypergrad.loss_scale import next_loss_scale
from keras_metapt.hypergrad.problem import (BilevelProblem, Estimator, HypergradResult,
                                            StepBatches, ensure_finite, train_inner)
from keras_metapt.hypergrad.ptft import (PTFT, FinetuneBatches, PretrainFinetuneProblem,
                                         PTFTParams, keras_problem)
from keras_metapt.hypergrad.reversible import ReversalCheck, Reversible
from keras_metapt.hypergrad.sama import (SAMA, FirstOrder, finite_difference_mixed_vjp,
                                         first_order)
from keras_metapt.hypergrad.unrolled import Unrolled

__all__ = [
    "Estimator",
    "BilevelProblem",
    "StepBatches",
    "HypergradResult",
    "ensure_finite",
    "train_inner",
    "next_loss_scale",
    "Unrolled",
    "Forward",
    "Implicit",
    "implicit_indirect_term",
    "EvoGrad",
    "Reversible",
    "ReversalCheck",
    "HyperDistill",
    "PretrainFinetuneProblem",
    "PTFTParams",
    "FinetuneBatches",
    "PTFT",
    "keras_problem",
    "SAMA",
    "FirstOrder",
    "first_order",
    "finite_difference_mixed_vjp",
    "compile_hypergradient",
    "CompiledHypergradient",
]
