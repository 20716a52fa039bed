"""`compile_hypergradient`: the estimator's graph called with its flat tensors.

References: central finite differences (float64) of the closed-form iterate of gradient
descent on the quadratic of tests.hypergrad.quadratic (per-step batches included); for the
cases that check the plumbing (nest structures, captured variables, seeds), the same
estimator called eagerly, which must agree to float64 rounding.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import linalg, optim
from keras_metapt.hypergrad import compile_hypergradient
from tests.conftest import rel_err
from tests.hypergrad.quadratic import Quadratic


@pytest.mark.parametrize("per_step_b", [False, True])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_unrolled_hypergradient_matches_finite_differences(per_step_b, jit_compile):
    quad = Quadratic(num_steps=8, per_step_b=per_step_b)
    params, hparams, inner_batch, target = quad.inputs()
    call = compile_hypergradient(km.Unrolled(optim.sgd(1.0), num_steps=8), quad.problem(),
                                 jit_compile=jit_compile)
    result = call(params, hparams, inner_batch, target)
    for got, ref in zip(result.hypergrad, quad.finite_difference(quad.outer_after)):
        assert rel_err(got, ref) < 1e-6
    np.testing.assert_allclose(result.params[0], quad.iterate(quad.c, quad.lr, 8), rtol=1e-12)
    assert bool(result.is_finite)


def test_new_values_reuse_the_trace_and_new_shapes_or_structures_trace_again():
    quad = Quadratic(num_steps=4)
    params, hparams, inner_batch, target = quad.inputs()
    estimator = km.Unrolled(optim.sgd(1.0), num_steps=4)
    call = compile_hypergradient(estimator, quad.problem())
    problem = quad.problem()
    for shift in (0.0, 0.5, -1.0):  # NumPy values, then tensors: one trace for all
        moved = [hparams[0] + shift, hparams[1]]
        got = call(params, moved, inner_batch, target)
        want = estimator(problem, params, moved, inner_batch, target)
        np.testing.assert_allclose(got.hypergrad[0], want.hypergrad[0], rtol=1e-12)
        got = call([tf.constant(params[0])], [tf.constant(h) for h in moved],
                   tf.constant(inner_batch), tf.constant(target))
        np.testing.assert_allclose(got.hypergrad[1], want.hypergrad[1], rtol=1e-12)
    assert call.num_traces == 1
    call(tuple(params), hparams, inner_batch, target)  # a tuple, not a list: a new structure
    assert call.num_traces == 2
    as32 = [x.astype(np.float32) for x in (params[0], hparams[0], hparams[1], inner_batch, target)]
    got = call([as32[0]], as32[1:3], as32[3], as32[4])  # a new dtype
    assert call.num_traces == 3 and got.hypergrad[0].dtype == tf.float32


def test_dict_nests_keep_their_leaves_apart():
    """Two dicts whose leaves share shapes but not keys: each must get its own trace,
    and every leaf must arrive at its own name (reference: the eager estimator)."""

    def inner(p, h, b):
        return 0.5 * tf.reduce_sum((p["u"] - h["a"]) ** 2) + tf.reduce_sum(p["v"] * h["b"] * b)

    def outer(p, h, b):
        return 0.5 * tf.reduce_sum((p["u"] + 2.0 * p["v"] - b) ** 2)

    def relabel(d):
        return {"a": d["b"], "b": d["a"]} if set(d) == {"a", "b"} else d

    problem = km.BilevelProblem(inner, outer)
    estimator = km.Implicit(linalg.cg(20, tolerance=0.0))
    call = compile_hypergradient(estimator, problem)
    rng = np.random.default_rng(0)
    params = {"u": rng.normal(size=3), "v": rng.normal(size=3)}
    hparams = {"a": rng.normal(size=3), "b": rng.normal(size=3)}
    for h in (hparams, relabel(hparams)):
        got = call(params, h, np.ones(3), np.zeros(3))
        want = estimator(problem, params, h, np.ones(3), np.zeros(3))
        for key in h:
            np.testing.assert_allclose(got.hypergrad[key], want.hypergrad[key], rtol=1e-10)


def test_captured_variables_are_read_at_every_call():
    """A loss that reads a tf.Variable: the compiled call sees the value of the moment."""
    scale = tf.Variable(1.0, dtype=tf.float64)
    problem = km.BilevelProblem(
        lambda p, h, b: 0.5 * tf.reduce_sum(tf.square(p[0] - scale * h[0])),
        lambda p, h, b: 0.5 * tf.reduce_sum(tf.square(p[0] - b)))
    estimator = km.Unrolled(optim.sgd(0.1), 1)
    call = compile_hypergradient(estimator, problem)
    args = ([np.array([1.0])], [np.array([0.5])], np.array([0.0]), np.array([0.0]))
    for value in (1.0, 3.0):
        scale.assign(value)
        # one SGD step: w1 = w0 - 0.1 (w0 - s h); d/dh (w1 - y)^2 / 2 = (w1 - y) 0.1 s
        w1 = 1.0 - 0.1 * (1.0 - value * 0.5)
        np.testing.assert_allclose(call(*args).hypergrad[0], [w1 * 0.1 * value], rtol=1e-12)
    assert call.num_traces == 1


def test_seed_and_opt_state_reach_the_estimator():
    quad = Quadratic(num_steps=2)
    params, hparams, inner_batch, target = quad.inputs()
    problem = quad.problem()
    evograd = km.EvoGrad(num_copies=3, sigma=1e-2, temperature=0.1)
    call = compile_hypergradient(evograd, km.BilevelProblem(problem.inner_loss,
                                                            problem.outer_loss))
    seed = tf.constant([3, 4], tf.int64)
    draws = [call(params, hparams[:1], inner_batch, target, seed=s).hypergrad[0]
             for s in (seed, seed, seed + 1)]
    np.testing.assert_allclose(
        draws[0], evograd(km.BilevelProblem(problem.inner_loss, problem.outer_loss), params,
                          hparams[:1], inner_batch, target, seed=seed).hypergrad[0], rtol=1e-10)
    np.testing.assert_array_equal(draws[0], draws[1])
    assert np.max(np.abs(draws[0] - draws[2])) > 0  # another seed, another draw
    momentum = km.Unrolled(optim.sgd(0.1, momentum=0.9), 2)
    call = compile_hypergradient(momentum, problem)
    velocity = optim.sgd(0.1, momentum=0.9).init([tf.constant(params[0])])
    velocity = tf.nest.map_structure(lambda v: v + 0.25, velocity)
    got = call(params, hparams, inner_batch, target, opt_state=velocity)
    want = momentum(problem, params, hparams, inner_batch, target, opt_state=velocity)
    np.testing.assert_allclose(got.params[0], want.params[0], rtol=1e-12)
    np.testing.assert_allclose(got.hypergrad[0], want.hypergrad[0], rtol=1e-10)


def test_refuses_what_is_not_an_estimator():
    with pytest.raises(TypeError, match="estimator must be"):
        compile_hypergradient(lambda *a: None, None)


def test_none_and_bool_leaves_are_part_of_the_key():
    """Python bools and Nones are constants of a trace: another value or place must trace
    again. Reference: the eager estimator on the same arguments."""

    def inner(p, h, b):
        scale = 3.0 if b["double"] else 1.0
        shift = b["a"] if b["a"] is not None else b["b"]
        return 0.5 * tf.reduce_sum((p[0] - scale * h[0] - shift) ** 2)

    problem = km.BilevelProblem(inner, lambda p, h, b: 0.5 * tf.reduce_sum((p[0] - b) ** 2))
    estimator = km.Unrolled(optim.sgd(0.1), 1)
    call = compile_hypergradient(estimator, problem)
    one, two = np.array([1.0]), np.array([2.0])
    batches = [{"double": True, "a": one, "b": None}, {"double": False, "a": one, "b": None},
               {"double": False, "a": None, "b": two}]
    for batch in batches:
        got = call([np.array([1.0])], [np.array([0.5])], batch, np.array([0.0]))
        want = estimator(problem, [np.array([1.0])], [np.array([0.5])], batch, np.array([0.0]))
        np.testing.assert_allclose(got.hypergrad[0], want.hypergrad[0], rtol=1e-12)
    assert call.num_traces == 3


def test_the_first_call_is_not_recorded_on_a_tape_either():
    quad = Quadratic(num_steps=2)
    params, hparams, inner_batch, target = quad.inputs()
    call = compile_hypergradient(km.Unrolled(optim.sgd(1.0), 2), quad.problem())
    h = [tf.Variable(x) for x in hparams]
    for _ in range(2):  # the tracing call and a cached one behave alike
        with tf.GradientTape() as tape:
            loss = call(params, [x.read_value() for x in h], inner_batch, target).outer_loss
        assert tape.gradient(loss, h) == [None, None]
