"""Bad input: every estimator raises a clear error naming the leaf, never updates silently."""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import Ridge

ESTIMATORS = {
    "unrolled": lambda: km.Unrolled(optim.sgd(0.1), num_steps=3),
    "forward": lambda: km.Forward(optim.sgd(0.1), num_steps=3),
    "implicit": lambda: km.Implicit(km.linalg.cg(5)),
    "evograd": lambda: km.EvoGrad(num_copies=2, sigma=0.1, temperature=0.1),
}


@pytest.fixture(params=sorted(ESTIMATORS))
def estimator(request):
    return ESTIMATORS[request.param]()


def ridge_inputs(dtype=np.float64):
    ridge = Ridge(d=3)
    inner, outer = ridge.batches(dtype)
    return ridge, [np.zeros(3, dtype)], [ridge.log_lam.astype(dtype)], inner, outer


def test_mixed_dtypes_name_the_leaf(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    with pytest.raises(km.InputMismatchError, match=r"hparams\[0\] has dtype float32"):
        estimator(ridge.problem(), params, [hparams[0].astype(np.float32)], inner, outer)


def test_integer_params_are_refused(estimator):
    ridge, _, hparams, inner, outer = ridge_inputs()
    with pytest.raises(km.InputMismatchError, match=r"params\[0\] has dtype int32"):
        estimator(ridge.problem(), [np.zeros(3, np.int32)], hparams, inner, outer)


def test_non_scalar_loss_is_refused(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    problem = km.BilevelProblem(lambda p, h, b: p[0] * tf.exp(h[0]), ridge.outer)
    with pytest.raises(km.InputMismatchError, match="inner_loss must return a scalar"):
        estimator(problem, params, hparams, inner, outer)


def test_unconnected_hyperparameter_is_named(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    unused = np.float64(0.3)
    with pytest.raises(km.UnconnectedHyperparameterError, match=r"hparams\['unused'\]"):
        estimator(km.BilevelProblem(lambda p, h, b: ridge.inner(p, [h["log_lam"]], b),
                                    lambda p, h, b: ridge.outer(p, [h["log_lam"]], b)),
                  params, {"log_lam": hparams[0], "unused": unused}, inner, outer)


def test_hyperparameter_only_in_outer_loss_is_fine(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    problem = km.BilevelProblem(lambda p, h, b: ridge.inner(p, h[:1], b),
                                lambda p, h, b: ridge.outer(p, h, b) + h[1] ** 2)
    result = estimator(problem, params, [hparams[0], np.float64(0.5)], inner, outer)
    assert float(result.hypergrad[1]) == pytest.approx(1.0)  # d/dh h^2 at 0.5, direct only


def nan_problem(ridge):
    # log(-1) = NaN enters the outer loss: the hypergradient is NaN.
    return km.BilevelProblem(ridge.inner,
                             lambda p, h, b: ridge.outer(p, h, b) * tf.math.log(h[0][0] - 10.0))


def test_non_finite_hypergradient_raises_eagerly(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    with pytest.raises(km.NonFiniteHypergradientError, match=r"hparams\[0\]"):
        estimator(nan_problem(ridge), params, hparams, inner, outer)


def test_non_finite_hypergradient_raises_in_graph(estimator):
    ridge, params, hparams, inner, outer = ridge_inputs()
    fn = tf.function(lambda p, h: estimator(nan_problem(ridge), p, h, inner, outer))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"hparams\[0\]"):
        fn(params, hparams)


def test_non_finite_under_xla_is_flagged_and_ensure_finite_raises(estimator):
    # XLA drops runtime assertions: the result carries is_finite, and ensure_finite raises.
    ridge, params, hparams, inner, outer = ridge_inputs()
    fn = tf.function(lambda p, h: estimator(nan_problem(ridge), p, h, inner, outer),
                     jit_compile=True)
    result = fn(params, hparams)
    assert not bool(result.is_finite)
    with pytest.raises(km.NonFiniteHypergradientError, match=r"hparams\[0\]"):
        km.ensure_finite(result)


def test_step_batches_shorter_than_horizon():
    ridge, params, hparams, _, outer = ridge_inputs()
    short = km.StepBatches((np.zeros((2, 60, 3)), np.zeros((2, 60))))
    with pytest.raises(km.InputMismatchError, match="2 batches but the estimator runs 3 steps"):
        km.Unrolled(optim.sgd(0.1), 3)(ridge.problem(), params, hparams, short, outer)


def test_bad_estimator_arguments():
    with pytest.raises(ValueError, match="truncate"):
        km.Unrolled(optim.sgd(0.1), num_steps=3, truncate=5)
    with pytest.raises(ValueError, match="solver"):
        km.Implicit("lu")
    with pytest.raises(ValueError, match="num_copies"):
        km.EvoGrad(num_copies=1)
