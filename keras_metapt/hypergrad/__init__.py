"""Hypergradient estimators, one module each, one calling convention.

    result = Estimator(...)(problem, params, hparams, inner_batch, outer_batch)

| estimator | cost per call                          | memory            |
|-----------|----------------------------------------|-------------------|
| Unrolled  | T gradients + ~2 per differentiated step | O(K * P)        |
| Forward   | n_phi JVPs per step, T steps           | O(P * n_phi)      |
| Implicit  | i (Neumann) or CG-iteration HVPs + 1 mixed VJP | O(P)      |
| EvoGrad   | K forwards + 1 backward, first order   | O(K * P)          |
| PTFT      | K FT steps + i HVPs + 1 mixed VJP      | O(P + K * P_psi)  |
"""

from keras_metapt.hypergrad.evograd import EvoGrad
from keras_metapt.hypergrad.forward import Forward
from keras_metapt.hypergrad.implicit import Implicit
from keras_metapt.hypergrad.problem import (BilevelProblem, HypergradResult, StepBatches,
                                            ensure_finite)
from keras_metapt.hypergrad.ptft import PTFT, PretrainFinetuneProblem
from keras_metapt.hypergrad.unrolled import Unrolled

__all__ = [
    "BilevelProblem",
    "StepBatches",
    "HypergradResult",
    "ensure_finite",
    "Unrolled",
    "Forward",
    "Implicit",
    "EvoGrad",
    "PretrainFinetuneProblem",
    "PTFT",
]
