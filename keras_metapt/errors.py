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

    # Inside tf.function, autograph re-raises an error from traced code by calling its type with
    # the message, but only for a few built-in types or a type whose __init__ *is*
    # Exception.__init__; any other type becomes a StagingError (autograph/pyct/error_utils.py,
    # ErrorMetadataBase.create_exception). ValueError has its own (identical) __init__, so take
    # Exception's: these classes then reach the caller of a tf.function as themselves.
    __init__ = Exception.__init__


class InputMismatchError(HypergradientError):
    """Shapes, dtypes or nest structures that do not fit together.

    Shapes: the losses see every leaf at the shape it is given, and TensorFlow's broadcasting
    applies inside them as written (a (d, 1) leaf times a (d,) parameter is a (d, d) product);
    the estimators cannot know the shape a loss meant. Shapes that the losses (or an optimizer
    step) cannot combine raise this error while the call is traced (eagerly: at once), naming
    the loss and the leaves of the shapes TensorFlow reports. Each hypergradient leaf has exactly
    its hyperparameter's shape (the gradient of a broadcast is summed back); a gradient of
    another shape (e.g. from a `tf.custom_gradient`) raises this error.
    """


class UnconnectedHyperparameterError(HypergradientError):
    """A hyperparameter has no influence on the outer loss (its gradient is None)."""


class NonFiniteHypergradientError(HypergradientError):
    """A hypergradient (or a quantity it is built from) contains NaN or Inf."""
