"""Input validation shared by the estimators: clear errors naming the leaf."""

import numpy as np
import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.errors import (InputMismatchError, NonFiniteHypergradientError,
                                 UnconnectedHyperparameterError)

__all__ = []  # internal module


def check_float_leaves(structure, prefix, dtype=None):
    """All leaves are floating tensors of one dtype; returns that dtype."""
    names = _tree.leaf_names(structure, prefix)
    leaves = tf.nest.flatten(structure)
    if not leaves:
        raise InputMismatchError(f"{prefix} is empty: nothing to differentiate")
    for name, leaf in zip(names, leaves):
        leaf_dtype = tf.as_dtype(leaf.dtype)
        if not leaf_dtype.is_floating:
            raise InputMismatchError(
                f"{name} has dtype {leaf_dtype.name}; parameters and hyperparameters "
                "must be floating point")
        if dtype is None:
            dtype = leaf_dtype
        elif leaf_dtype != dtype:
            raise InputMismatchError(
                f"{name} has dtype {leaf_dtype.name} but other parameters and "
                f"hyperparameters are {tf.as_dtype(dtype).name}; use one dtype "
                "throughout (cast before calling)")
    return dtype


def check_scalar(value, what):
    value = tf.convert_to_tensor(value)
    if value.shape.rank is not None and value.shape.rank != 0:
        raise InputMismatchError(f"{what} must return a scalar, got shape {value.shape}")
    if not tf.as_dtype(value.dtype).is_floating:
        raise InputMismatchError(f"{what} must return a floating scalar, got {value.dtype.name}")
    return value


def check_connected(grads, structure, prefix, what):
    """Raises if any gradient leaf is None (the leaf does not influence ``what``)."""
    names = _tree.leaf_names(structure, prefix)
    for name, g in zip(names, tf.nest.flatten(grads)):
        if g is None:
            raise UnconnectedHyperparameterError(
                f"{name} does not influence {what}: its gradient is None. Remove it from "
                "the hyperparameters or make the losses depend on it.")


def finite_flag(structure):
    """A boolean scalar tensor: every element of every leaf is finite."""
    flags = [tf.reduce_all(tf.math.is_finite(x)) for x in tf.nest.flatten(structure)]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def check_finite(structure, prefix, what="hypergradient"):
    """Raises NonFiniteHypergradientError naming the first non-finite leaf.

    Eagerly this raises at once. Inside a graph it inserts `check_numerics`, which
    raises when the graph runs; XLA drops such runtime assertions, so under
    ``jit_compile=True`` callers must check the returned finite flag outside the
    compiled function (see `keras_metapt.hypergrad.ensure_finite`).
    """
    names = _tree.leaf_names(structure, prefix)
    leaves = tf.nest.flatten(structure)
    if tf.executing_eagerly():
        for name, leaf in zip(names, leaves):
            if not np.all(np.isfinite(leaf.numpy())):
                raise NonFiniteHypergradientError(
                    f"the {what} for {name} is not finite (NaN or Inf); no update was "
                    "applied. Lower the learning rates, check the losses, or use float64.")
        return structure
    checked = [tf.debugging.check_numerics(leaf, f"the {what} for {name} is not finite")
               for name, leaf in zip(names, leaves)]
    return tf.nest.pack_sequence_as(structure, checked)
