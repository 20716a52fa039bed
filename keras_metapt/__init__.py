"""keras_metapt: meta-learn pre-training hyperparameters with hypergradients, in Keras 3.

keras_metapt runs on Keras 3 with the TensorFlow backend. Importing it sets
KERAS_BACKEND=tensorflow when no backend was chosen, and fails with a clear message
when another backend was.
"""

import os

__version__ = "0.1.0"

_BACKEND_HELP = (
    "keras_metapt needs Keras 3 on the TensorFlow backend (it uses tf.GradientTape, "
    "tf.autodiff.ForwardAccumulator and tf.distribute). Set KERAS_BACKEND=tensorflow "
    "before importing keras or keras_metapt.")

_requested = os.environ.get("KERAS_BACKEND")
if _requested is None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
elif _requested != "tensorflow":
    raise ImportError(f"KERAS_BACKEND={_requested!r}. {_BACKEND_HELP}")

import keras  # noqa: E402  (after the backend is fixed)

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"Keras was already imported with the {keras.backend.backend()!r} backend. {_BACKEND_HELP}")

from keras_metapt import (callbacks, distribute, errors, export, fewshot,  # noqa: E402
                          functional, hyper, hypergrad, linalg, losses, optim,
                          perturb_transfer, reweighting, simclr, tasks, taskmeta)
from keras_metapt.errors import (HypergradientError, InputMismatchError,  # noqa: E402
                                 NonFiniteHypergradientError, UnconnectedHyperparameterError)
from keras_metapt.meta_pretrainer import (HyperstepSchedule, MetaPretrainer,  # noqa: E402
                                          meta_dataset)
from keras_metapt.hypergrad import (PTFT, BilevelProblem, EvoGrad, Forward,  # noqa: E402
                                    HypergradResult, HyperDistill, Implicit,
                                    PretrainFinetuneProblem,
                                    PTFTParams, Reversible, SAMA, StepBatches, Unrolled,
                                    ensure_finite)

__all__ = [
    "__version__",
    # modules
    "callbacks", "distribute", "errors", "export", "fewshot", "functional", "hyper", "hypergrad",
    "linalg", "losses", "optim", "perturb_transfer", "reweighting", "simclr", "tasks", "taskmeta",
    # meta-pre-training inside model.fit()
    "MetaPretrainer", "HyperstepSchedule", "meta_dataset",
    # the calling convention and the estimators
    "BilevelProblem", "StepBatches", "HypergradResult", "ensure_finite",
    "Unrolled", "Forward", "Implicit", "EvoGrad", "SAMA", "Reversible", "HyperDistill",
    "PretrainFinetuneProblem", "PTFTParams", "PTFT",
    # errors
    "HypergradientError", "InputMismatchError", "UnconnectedHyperparameterError",
    "NonFiniteHypergradientError",
]
