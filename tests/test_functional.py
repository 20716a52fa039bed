"""Stateless application of Keras models, and a hypergradient through a Keras MLP.

References: the Keras model's own call (same variables); float64 central finite
differences of the unrolled training loop for the hypergradient.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_metapt as km
from keras_metapt import functional, optim
from tests.conftest import compiled, rel_err


def bn_model(dtype="float32"):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.ReLU(dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
    ])
    return model


def test_stateless_apply_equals_keras_call_and_touches_no_variable():
    model = bn_model()
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    trainable, non_trainable = functional.model_state(model)
    before = [v.numpy().copy() for v in model.variables]
    out, new_state = functional.stateless_apply(model, trainable, non_trainable, x, training=True)
    np.testing.assert_allclose(out.numpy(), model(x, training=True).numpy(), rtol=1e-5, atol=1e-6)
    # training=True returns updated BatchNorm statistics but leaves the variables alone
    moving_mean = [i for i, v in enumerate(model.non_trainable_variables) if "moving_mean" in v.path][0]
    assert not np.allclose(new_state[moving_mean].numpy(), non_trainable[moving_mean].numpy())
    for v, b in zip(model.variables[:len(before)], before):
        if "moving" not in v.path:
            np.testing.assert_array_equal(v.numpy(), b)
    out_inf, same_state = functional.stateless_apply(model, trainable, non_trainable, x, training=False)
    for a, b in zip(same_state, non_trainable):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_stateless_call_of_a_bare_layer_follows_its_mixed_precision_policy(policy):
    # Reference: the layer's own __call__ (Keras casts inputs and reads variables in the compute
    # dtype); Keras' stateless_call alone would compute this Dense in float32.
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = keras.layers.Dense(3)
        layer.build((None, 4))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(np.random.default_rng(1).normal(size=(5, 4)), tf.float32)
    trainable, non_trainable = functional.model_state(layer)
    out, _ = functional.stateless_call(layer, trainable, non_trainable, x)
    assert out.dtype == policy.split("_")[1] and trainable[0].dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), layer(x).numpy())
    plain, _ = layer.stateless_call(trainable, non_trainable, x)
    assert plain.dtype == tf.float32  # what functional.stateless_call corrects
    half = functional.full_precision({"a": out, "b": tf.constant([1], tf.int32)})
    assert half["a"].dtype == tf.float32 and half["b"].dtype == tf.int32


def test_stateless_apply_compiles_with_xla():
    model = bn_model()
    x = np.ones((5, 4), np.float32)
    trainable, non_trainable = functional.model_state(model)
    fn = tf.function(lambda t, n: functional.stateless_apply(model, t, n, x)[0], jit_compile=True)
    np.testing.assert_allclose(fn(trainable, non_trainable).numpy(), model(x).numpy(), rtol=1e-5)


def test_wrong_shape_names_the_variable():
    model = bn_model()
    trainable, non_trainable = functional.model_state(model)
    trainable[0] = tf.zeros([5, 8])
    with pytest.raises(km.InputMismatchError, match=r"trainable\[0\] \(sequential.*dense.*kernel\)"):
        functional.stateless_apply(model, trainable, non_trainable, np.ones((2, 4), np.float32))


def test_unbuilt_model_is_refused():
    with pytest.raises(km.InputMismatchError, match="not built"):
        functional.model_state(keras.Sequential([keras.layers.Dense(2)]))


def test_assign_state_round_trip():
    model = bn_model()
    trainable, non_trainable = functional.model_state(model)
    doubled = [2 * t for t in trainable]
    functional.assign_state(model, doubled)
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(), doubled[0].numpy())


def sgd_finite_differences(problem, params0, h0, lr, steps, inner_batch, outer_batch, eps=1e-6):
    """Central differences (float64) in h of the outer loss after ``steps`` SGD steps on the
    inner loss, the steps run forward (first derivatives only)."""
    def outer_after_training(h):
        params = list(params0)
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = problem.inner_loss(params, [tf.constant(h)], inner_batch)
            params = [p - lr * g for p, g in zip(params, tape.gradient(loss, params))]
        return float(problem.outer_loss(params, None, outer_batch))

    return np.array([(outer_after_training(h0 + eps * e) - outer_after_training(h0 - eps * e))
                     / (2 * eps) for e in np.eye(len(h0))])


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_unrolled_hypergradient_through_keras_mlp_matches_finite_differences(mode):
    # Per-example loss weights w_i = sigmoid(h_i) on a float64 Keras MLP, 4 SGD steps.
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    xv, yv = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    trainable, non_trainable = functional.model_state(model)
    T, lr = 4, 0.2

    def per_example(params, xs, ys):
        out, _ = functional.stateless_apply(model, params, non_trainable, xs)
        return tf.reduce_mean((out - ys) ** 2, axis=-1)

    problem = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(tf.sigmoid(h[0]) * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)))
    h0 = rng.normal(size=8) * 0.5
    result = compiled(lambda p, h: km.Unrolled(optim.sgd(lr), T)(problem, p, h, (x, y), (xv, yv)),
                      mode)(trainable, [h0])

    fd = sgd_finite_differences(problem, trainable, h0, lr, T, (x, y), (xv, yv))
    assert rel_err(result.hypergrad[0], fd) < 1e-6


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_one_step_hypergradient_through_batch_statistics_matches_finite_differences(mode):
    """A Keras model with BatchNormalization in training mode (batch statistics): the
    hypergradient of a differentiated SGD step needs second derivatives through the batch
    variance, which tf.nn.moments gets wrong (it stops the mean's gradient inside the
    variance). Reference: float64 central differences of the step run forward (first
    derivatives only)."""
    rng = np.random.default_rng(1)
    model = bn_model("float64")
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 3))
    xv, yv = rng.normal(size=(7, 4)), rng.normal(size=(7, 3))
    trainable, non_trainable = functional.model_state(model)
    lr = 0.3

    def per_example(params, xs, ys):
        out, _ = functional.stateless_apply(model, params, non_trainable, xs, training=True)
        return tf.reduce_mean((out - ys) ** 2, axis=-1)

    problem = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(tf.sigmoid(h[0]) * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)))
    h0 = rng.normal(size=10) * 0.5
    result = compiled(lambda p, h: km.Unrolled(optim.sgd(lr), 1)(problem, p, h, (x, y), (xv, yv)),
                      mode)(trainable, [h0])

    fd = sgd_finite_differences(problem, trainable, h0, lr, 1, (x, y), (xv, yv))
    assert rel_err(result.hypergrad[0], fd) < 1e-6


def test_hvp_through_batch_statistics_matches_finite_differences_of_the_gradient():
    """Reference: (grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps) in float64."""
    rng = np.random.default_rng(2)
    model = bn_model("float64")
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    trainable, non_trainable = functional.model_state(model)

    def loss(params):
        out, _ = functional.stateless_apply(model, params, non_trainable, x, training=True)
        return tf.reduce_mean((out - y) ** 2)

    def gradient(params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            value = loss(params)
        return tape.gradient(value, params)

    v = [tf.constant(rng.normal(size=p.shape)) for p in trainable]
    eps = 1e-6
    plus = gradient([p + eps * d for p, d in zip(trainable, v)])
    minus = gradient([p - eps * d for p, d in zip(trainable, v)])
    fd = np.concatenate([((a - b) / (2 * eps)).numpy().ravel() for a, b in zip(plus, minus)])
    for mode in ("reverse_over_reverse", "forward_over_reverse"):
        hv = km.linalg.hvp(loss, list(trainable), v, mode)
        assert rel_err(np.concatenate([h.numpy().ravel() for h in hv]), fd) < 1e-6, mode


def test_exact_batch_moments_keeps_forward_values_and_restores_keras():
    from keras.src.backend.tensorflow import nn as keras_tf_nn
    original = keras_tf_nn._compute_moments
    x = tf.constant(np.random.default_rng(3).normal(size=(6, 5)))
    keras_mean, keras_var = keras.ops.moments(x, axes=[0])
    with functional.exact_batch_moments():
        with functional.exact_batch_moments():  # nested: restored by the outer one only
            assert keras_tf_nn._compute_moments is not original
        assert keras_tf_nn._compute_moments is not original
        mean, var = keras.ops.moments(x, axes=[0])
    assert keras_tf_nn._compute_moments is original
    np.testing.assert_array_equal(mean.numpy(), keras_mean.numpy())
    np.testing.assert_allclose(var.numpy(), keras_var.numpy(), rtol=1e-15)
    np.testing.assert_allclose(var.numpy(), x.numpy().var(0), rtol=1e-12)
