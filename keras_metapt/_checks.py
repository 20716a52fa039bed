"""Input validation shared by the estimators: clear errors naming the leaf."""

import os
import re
import traceback

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import _tree
from keras_metapt.errors import (HypergradientError, InputMismatchError,
                                 NonFiniteHypergradientError, UnconnectedHyperparameterError)

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


def check_shapes_like(grads, structure, prefix, what):
    """Raises if a gradient leaf's (static) shape is not its leaf's: a gradient is never
    broadcast or reshaped to fit."""
    names = _tree.leaf_names(structure, prefix)
    for name, g, leaf in zip(names, tf.nest.flatten(grads), tf.nest.flatten(structure)):
        if g is not None and not g.shape.is_compatible_with(leaf.shape):
            raise InputMismatchError(
                f"the {what} for {name} has shape {tuple(g.shape)} but {name} has shape "
                f"{tuple(leaf.shape)}; a gradient in the losses (a tf.custom_gradient?) returns "
                "another shape than its input's")


# Shape errors from TensorFlow/Keras, re-raised naming the leaves. Only errors raised inside
# TensorFlow or Keras are translated (not a ValueError of the caller's own code), and only those
# whose message is about shapes.
_FRAMEWORK_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (tf, keras))
_SHAPE_WORDS = re.compile(r"shape|incompatible|dimensions must be equal", re.IGNORECASE)
_DIM = r"(?:-?\d+|None|\?)"
_SHAPE_LIST = re.compile(rf"([\[(])\s*({_DIM}(?:\s*,\s*{_DIM})*)?\s*,?\s*[\])]")
_MAX_NAMED = 8


def _is_shape_error(error):
    if isinstance(error, HypergradientError) or not _SHAPE_WORDS.search(str(error)):
        return False
    if isinstance(error, tf.errors.InvalidArgumentError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return (isinstance(error, ValueError) and bool(frames)
            and frames[-1].filename.startswith(_FRAMEWORK_DIRS))


def _mentioned_shapes(text):
    """Shapes written as [4], [40,4], (None, 4), (3,) or [] in a TensorFlow/Keras message."""
    shapes = []
    for bracket, body in _SHAPE_LIST.findall(text):
        if not body:
            if bracket == "[":
                shapes.append(())
            continue
        shapes.append(tuple(None if d.strip() in ("None", "?") else int(d)
                            for d in body.split(",")))
    return shapes


def _fits(shape, mentioned):
    return len(shape) == len(mentioned) and all(
        m is None or s is None or m == s for s, m in zip(shape, mentioned))


def shape_error_message(what, error, named):
    """Names the leaves (of ``named``: prefix -> nest) whose shapes TensorFlow's message
    mentions; all leaf shapes of the first nest (the hparams) when none match."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).strip()
    text = re.sub(r"\s*name:\s*$", "", text)
    mentioned = _mentioned_shapes(text)
    leaves = [pair for prefix, structure in named.items()
              for pair in _tree.leaf_shapes(structure, prefix)]
    hits = [(n, s) for n, s in leaves if any(_fits(s, m) for m in mentioned)]
    if hits:
        described = ", ".join(f"{n} has shape {s}" for n, s in hits[:_MAX_NAMED])
        if len(hits) > _MAX_NAMED:
            described += f" (and {len(hits) - _MAX_NAMED} more)"
    else:
        first = next(iter(named))
        described = "no leaf has the shapes TensorFlow names; " + ", ".join(
            f"{n} has shape {s}" for n, s in _tree.leaf_shapes(named[first], first)[:_MAX_NAMED])
    return (f"{what} failed on the shapes it was given: {described}. TensorFlow: {text}\n"
            "Give every leaf the shape the losses expect (inside the losses TensorFlow "
            "broadcasting applies as written; see keras_metapt.errors.InputMismatchError).")


class naming_shape_errors:  # noqa: N801 (used as a context manager, like a function)
    """``with naming_shape_errors(what, named):`` re-raises a TensorFlow/Keras shape error from
    the block as `InputMismatchError` naming ``what`` and the matching leaves of ``named``
    (an ordered dict prefix -> nest, e.g. {"hparams": hparams, "params": params})."""

    def __init__(self, what, named):
        self.what = what
        self.named = named

    def __enter__(self):
        return self

    def __exit__(self, exc_type, error, tb):
        if error is None or not _is_shape_error(error):
            return False
        raise InputMismatchError(shape_error_message(self.what, error, self.named)) from error


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
