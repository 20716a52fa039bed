"""Meta-learning what a family of tasks shares: an initialisation for SGD (MAML, first-order
MAML, Reptile / federated averaging, Continual Trajectory Shifting), per-coordinate step
sizes (ARUBA) and a preconditioner made of warp layers (WarpGrad).

The protocol, followed by every method (base class `TaskMetaLearner`):

    learner = Method(loss_fn, initial_params, *, inner_steps, inner_learning_rate, <settings>)
    metrics = learner.meta_step(support, query=None, task_weights=None)   # one meta-update
    params = learner.adapt(support, num_steps=None)                       # one task
    phi = learner.initial_values()

- loss_fn(params, batch) -> scalar: a pure loss over a nest of parameter tensors.
- support, query: a meta-batch of M tasks, nests whose leaves have a leading task dimension
  (`keras_metapt.tasks.stack_episodes`); support may be `hypergrad.StepBatches` with leaves
  [M, T, ...] (minibatch t at inner step t, for many-shot tasks).
- Adaptation is SGD from phi (`sgd_adapt`) with ``step_sizes()``: a scalar, or ARUBA's
  per-coordinate rates.

| method  | meta-gradient / update                       | cost per task          | memory  |
|---------|----------------------------------------------|------------------------|---------|
| MAML    | d L_Q(theta_T)/d phi via `hypergrad.Unrolled` | T grads + ~2T backward | O(T*P)  |
| FOMAML  | grad L_Q(theta_T)                             | T + 1 gradients        | O(P)    |
| Reptile | phi += eps (theta_T - phi)                    | T gradients            | O(P)    |
| ARUBA   | Reptile + eta = sqrt(B / G) per coordinate    | T gradients            | O(P)+3P |
| CTS     | Reptile's step after every inner step, shifts | T gradients            | O(M*P)  |
| WarpGrad| warp layers by J(omega) at S trajectory points; phi by Leap or FOMAML | T + ~4S grads | O(M*S*P) |

References without meta-learning: `FromScratch` (a fixed random initialisation) and
`MultitaskPretraining` (supervised pre-training over all meta-training classes, then
fine-tuning). The image families' learner is `conv_classifier_*` (module ``classifier``),
the molecule family's `GINTaskModel` (module ``graph_classifier``: a GIN and a linear head,
optionally with warp layers).
"""

from keras_metapt.taskmeta.aruba import ARUBA
from keras_metapt.taskmeta.baselines import FromScratch, MultitaskPretraining
from keras_metapt.taskmeta.classifier import (classification_accuracy, classification_loss,
                                              conv_classifier_logits, conv_classifier_params,
                                              identity_warp_params, warped_classification_loss,
                                              warped_classifier_logits)
from keras_metapt.taskmeta.cts import ContinualTrajectoryShifting
from keras_metapt.taskmeta.graph_classifier import GINTaskModel, binary_auroc, pack_graph_sets
from keras_metapt.taskmeta.learner import TaskMetaLearner, sgd_adapt
from keras_metapt.taskmeta.maml import MAML
from keras_metapt.taskmeta.reptile import Reptile
from keras_metapt.taskmeta.warpgrad import WarpGrad

__all__ = ["TaskMetaLearner", "sgd_adapt", "MAML", "Reptile", "ARUBA",
           "ContinualTrajectoryShifting", "WarpGrad", "FromScratch",
           "MultitaskPretraining", "conv_classifier_params", "conv_classifier_logits",
           "classification_loss", "classification_accuracy", "identity_warp_params",
           "warped_classifier_logits", "warped_classification_loss", "GINTaskModel",
           "pack_graph_sets", "binary_auroc"]
