"""Stateless application of Keras 3 models: (params, state, inputs) -> (outputs, state).

Keras objects live at the edges of keras_metapt; the core works on explicit nests
of tensors. These functions move between the two:

    trainable, non_trainable = model_state(model)
    outputs, non_trainable = stateless_apply(model, trainable, non_trainable, x, training)
    assign_state(model, trainable, non_trainable)

``non_trainable`` holds state such as BatchNorm moving statistics. With
``training=True`` the returned state is updated; it is the caller's choice to keep
it (a hyperstep should not: see the BatchNorm note in the README).
"""

import contextlib
import functools
import threading

import tensorflow as tf

from keras_metapt.errors import InputMismatchError

__all__ = ["model_state", "stateless_apply", "stateless_call", "full_precision", "assign_state",
           "exact_batch_moments"]


def model_state(model):
    """Current values of (trainable, non-trainable) variables, as lists of tensors."""
    _require_built(model)
    return ([tf.convert_to_tensor(v.value) for v in model.trainable_variables],
            [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables])


def _require_built(model):
    if not model.built:
        raise InputMismatchError(
            f"model {model.name!r} is not built; call it once on example inputs (or "
            "model.build(input_shape)) so that its variables exist")


def _check_against(variables, values, what):
    if len(values) != len(variables):
        raise InputMismatchError(
            f"{what}: got {len(values)} tensors for {len(variables)} variables")
    for i, (var, value) in enumerate(zip(variables, values)):
        if not tf.TensorShape(var.shape).is_compatible_with(value.shape):
            raise InputMismatchError(
                f"{what}[{i}] ({var.path}) has shape {value.shape}, expected {tuple(var.shape)}")
        if tf.as_dtype(value.dtype) != tf.as_dtype(var.dtype):
            raise InputMismatchError(
                f"{what}[{i}] ({var.path}) has dtype {tf.as_dtype(value.dtype).name}, "
                f"expected {tf.as_dtype(var.dtype).name}")


def stateless_apply(model, trainable, non_trainable, inputs, training=False):
    """Runs ``model`` on ``inputs`` with the given variable values; touches no variable.

    Returns (outputs, new_non_trainable). Differentiable with respect to
    ``trainable`` (and ``inputs``), in tapes, forward accumulators and XLA.
    Cost: one forward pass.
    """
    _require_built(model)
    trainable = list(trainable)
    non_trainable = list(non_trainable)
    _check_against(model.trainable_variables, trainable, "trainable")
    _check_against(model.non_trainable_variables, non_trainable, "non_trainable")
    outputs, new_state = stateless_call(model, trainable, non_trainable, inputs, training)
    return outputs, list(new_state)


def stateless_call(layer, trainable, non_trainable, inputs, training=None):
    """``layer.stateless_call`` with the layer's mixed-precision policy applied.

    Keras' ``stateless_call`` runs ``layer.call`` directly: a layer with a mixed policy
    (``mixed_float16``, ``mixed_bfloat16``) would then compute in float32 with its float32
    variables (a functional or sequential model is spared, because its sublayers are
    called). Here, as in ``layer(inputs)``, floating inputs are cast to the layer's compute
    dtype and float variables are read in it (Keras' autocast scope); with a float32 policy
    this is ``layer.stateless_call``. ``training=None`` passes no training argument.
    Returns (outputs, new non-trainable values).
    """
    kwargs = {} if training is None else {"training": training}
    if layer.compute_dtype == layer.variable_dtype:
        return layer.stateless_call(trainable, non_trainable, inputs, **kwargs)
    from keras.src import backend as keras_backend
    dtype = tf.as_dtype(layer.compute_dtype)
    inputs = tf.nest.map_structure(
        lambda t: tf.cast(t, dtype) if tf.is_tensor(t) and t.dtype.is_floating else t, inputs)
    with keras_backend.AutocastScope(layer.compute_dtype):
        return layer.stateless_call(trainable, non_trainable, inputs, **kwargs)


# compute dtypes of Keras' mixed policies (mixed_float16, mixed_bfloat16)
HALF_PRECISION = ("float16", "bfloat16")


def full_precision(tree):
    """Casts the float16/bfloat16 leaves of a nest to float32 (mixed-precision outputs before a
    loss: losses and their gradients' first cotangents are computed in float32)."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if tf.is_tensor(t) and t.dtype.name in HALF_PRECISION
        else t, tree)


def assign_state(model, trainable, non_trainable=None):
    """Writes values back into the model's variables (after checking shapes and dtypes)."""
    _require_built(model)
    _check_against(model.trainable_variables, list(trainable), "trainable")
    for var, value in zip(model.trainable_variables, trainable):
        var.assign(value)
    if non_trainable is not None:
        _check_against(model.non_trainable_variables, list(non_trainable), "non_trainable")
        for var, value in zip(model.non_trainable_variables, non_trainable):
            var.assign(value)


# ----------------------------------------------------------------------------- batch moments

def _exact_moments(x, axes, keepdims):
    """mean and mean((x - mean)^2), differentiable to every order."""
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


_MOMENTS_LOCK = threading.Lock()
_MOMENTS_STATE = {"depth": 0, "original": None}


@contextlib.contextmanager
def exact_batch_moments():
    """Makes Keras batch normalisation in training mode differentiable to second order while
    the context is open (while a function is traced or run eagerly inside it).

    Keras' TensorFlow backend takes batch moments from ``tf.nn.moments``, which computes the
    variance as mean((x - stop_gradient(mean))^2): the stopped term has a zero first
    derivative, so gradients are exact, but it does contribute to second derivatives, so
    Hessian-vector products and differentiated optimizer steps through a network with
    batch statistics come out wrong. Inside the context the variance keeps the gradient to the
    mean (the same forward values). Every estimator call and `linalg.hvp` / `mixed_vjp`
    open it. Private Keras: the backend's ``_compute_moments`` (pinned by
    tests/test_keras_overrides.py). Cost: a few extra elementwise ops in backward passes.
    """
    from keras.src.backend.tensorflow import nn as keras_tf_nn
    with _MOMENTS_LOCK:
        if _MOMENTS_STATE["depth"] == 0:
            _MOMENTS_STATE["original"] = keras_tf_nn._compute_moments
            keras_tf_nn._compute_moments = _exact_moments
        _MOMENTS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _MOMENTS_LOCK:
            _MOMENTS_STATE["depth"] -= 1
            if _MOMENTS_STATE["depth"] == 0:
                keras_tf_nn._compute_moments = _MOMENTS_STATE["original"]


def with_exact_batch_moments(fn):
    """Decorator: ``fn`` runs inside `exact_batch_moments`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with exact_batch_moments():
            return fn(*args, **kwargs)
    return wrapper
