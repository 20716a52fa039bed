"""Errors raised when a bilevel problem is ill-posed or a hypergradient is unusable.

Every error names the offending leaf (``hparams[1]``, ``params['dense/kernel']``)
so that the fix is obvious, and each one is raised *before* any update is applied.
"""

__all__ = [
    "HypergradientError",
    "InputMismatchError",
    "UnconnectedHyperparameterError",
    "NonFiniteHypergradientError",
]


class HypergradientError(ValueError):
    """Base class of the errors raised by keras_metapt's hypergradient code."""


class InputMismatchError(HypergradientError):
    """Shapes, dtypes or nest structures that do not fit together."""


class UnconnectedHyperparameterError(HypergradientError):
    """A hyperparameter has no influence on the outer loss (its gradient is None)."""


class NonFiniteHypergradientError(HypergradientError):
    """A hypergradient (or a quantity it is built from) contains NaN or Inf."""
