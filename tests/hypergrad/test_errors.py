"""Bad input: every estimator raises a clear error naming the leaf, never updates silently.

References: the error class (and leaf name) expected for each bad input, eagerly, under
tf.function and under tf.function(jit_compile=True) (the class raised while tracing is the class
the caller catches); for the documented broadcast of a (d, 1) hyperparameter, the hypergradient
of the equivalent scalar problem (s = logsumexp(h)) times ds/dh = softmax(h).
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import Ridge, compiled
from tests.hypergrad import test_ptft as ptft_toy

ESTIMATORS = {
    "unrolled": lambda: km.Unrolled(optim.sgd(0.1), num_steps=3),
    "forward": lambda: km.Forward(optim.sgd(0.1), num_steps=3),
    "reversible": lambda: km.Reversible(num_steps=3),
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
    if isinstance(estimator, km.Reversible):  # its buffer has no XLA form: refused by name
        with pytest.raises(ValueError, match="does not compile with XLA"):
            fn(params, hparams)
        return
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


# --------------------------------------------------------------------------- under tf.function
# The documented classes reach the caller as themselves from inside tf.function (autograph
# re-raises errors raised while it traces; it used to turn these into StagingError).

MODES = {"graph": False, "xla": True}  # tf.function(jit_compile=...)

TRACED_ESTIMATORS = dict(
    ESTIMATORS, sama=lambda: km.SAMA(optim.sgd(0.1)))


def caught(fn, *args):
    """The error fn raises, caught the way a user catches it: ``except km.HypergradientError``."""
    try:
        fn(*args)
    except km.HypergradientError as error:  # a StagingError would escape this clause
        return error
    pytest.fail("no HypergradientError was raised")


@pytest.mark.parametrize("jit", sorted(MODES.values()))
@pytest.mark.parametrize("name", km.errors.__all__)
def test_every_error_class_keeps_its_class_through_tf_function(name, jit):
    # Reference: the class raised inside the traced body is the class the caller catches.
    cls = getattr(km.errors, name)

    def body(x):
        if x.shape.rank == 0:  # always, at trace time
            raise cls("hparams[0] is wrong")
        return x

    error = caught(tf.function(body, jit_compile=jit), tf.constant(1.0))
    assert type(error) is cls
    assert "hparams[0] is wrong" in str(error)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(TRACED_ESTIMATORS))
def test_input_mismatch_is_caught_by_class_inside_tf_function(name, mode):
    estimator = TRACED_ESTIMATORS[name]()
    ridge, params, hparams, inner, outer = ridge_inputs()
    fn = tf.function(lambda p, h: estimator(ridge.problem(), p, h, inner, outer),
                     jit_compile=MODES[mode])
    error = caught(fn, params, [hparams[0].astype(np.float32)])
    assert isinstance(error, km.InputMismatchError)
    assert "hparams[0] has dtype float32" in str(error)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(TRACED_ESTIMATORS))
def test_unconnected_hyperparameter_is_caught_by_class_inside_tf_function(name, mode):
    estimator = TRACED_ESTIMATORS[name]()
    ridge, params, hparams, inner, outer = ridge_inputs()
    problem = km.BilevelProblem(lambda p, h, b: ridge.inner(p, [h["log_lam"]], b),
                                lambda p, h, b: ridge.outer(p, [h["log_lam"]], b))
    fn = tf.function(lambda p, h: estimator(problem, p, h, inner, outer), jit_compile=MODES[mode])
    error = caught(fn, params, {"log_lam": hparams[0], "unused": np.float64(0.3)})
    assert isinstance(error, km.UnconnectedHyperparameterError)
    assert "hparams['unused']" in str(error)


def ptft_call(problem, phi, mode):
    estimator = km.PTFT(optim.sgd(ptft_toy.FT_LR), unroll_steps=1,
                        solve=km.linalg.neumann(1, 0.05))
    fn = lambda params, phi: estimator(  # noqa: E731
        problem, params, phi, (ptft_toy.X_PT, ptft_toy.Y_PT),
        ((ptft_toy.X_MT, ptft_toy.Y_MT), (ptft_toy.X_MV, ptft_toy.Y_MV)))
    if mode != "eager":
        fn = tf.function(fn, jit_compile=MODES[mode])
    return lambda: fn((ptft_toy.THETA_E, ptft_toy.THETA_H, ptft_toy.PSI), phi)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_ptft_errors_are_caught_by_class_inside_tf_function(mode):
    error = caught(ptft_call(ptft_toy.PROBLEM, [ptft_toy.PHI.astype(np.float32)], mode))
    assert isinstance(error, km.InputMismatchError)
    assert "hparams[0] has dtype float32" in str(error)

    problem = km.PretrainFinetuneProblem(
        lambda e, h, phi, b: ptft_toy.pt_loss(e, h, [phi["w"]], b), ptft_toy.ft_loss)
    error = caught(ptft_call(problem, {"w": ptft_toy.PHI, "unused": np.float64(0.3)}, mode))
    assert isinstance(error, km.UnconnectedHyperparameterError)
    assert "hparams['unused']" in str(error)


# --------------------------------------------------------------------------- shapes
# Rule (README, InputMismatchError): the losses see every leaf at the shape it is given and
# TensorFlow broadcasting applies inside them as written; shapes they cannot combine raise
# InputMismatchError naming the loss and the leaves; each hypergradient leaf has exactly its
# hyperparameter's shape.

ALL_MODES = ["eager"] + sorted(MODES)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_hyperparameter_of_wrong_length_names_the_leaf(estimator, mode):
    ridge, params, _, inner, outer = ridge_inputs()  # d = 3
    fn = compiled(lambda p, h: estimator(ridge.problem(), p, h, inner, outer), mode)
    error = caught(fn, params, [np.full(4, -1.0)])
    assert isinstance(error, km.InputMismatchError)
    message = str(error)
    assert "inner_loss" in message
    assert "hparams[0] has shape (4,)" in message
    assert "params[0] has shape (3,)" in message


@pytest.mark.parametrize("mode", ALL_MODES)
def test_ptft_hyperparameter_of_wrong_length_names_the_leaf(mode):
    error = caught(ptft_call(ptft_toy.PROBLEM, [np.zeros(3)], mode))  # phi has 2 entries
    assert isinstance(error, km.InputMismatchError)
    assert "pt_loss" in str(error)
    assert "hparams[0] has shape (3,)" in str(error)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_batch_that_does_not_fit_the_parameters_is_named(estimator, mode):
    ridge, params, hparams, inner, (x_val, y_val) = ridge_inputs()
    bad_outer = (np.concatenate([x_val, x_val[:, :1]], axis=1), y_val)  # 4 features, w has 3
    fn = compiled(lambda p, h: estimator(ridge.problem(), p, h, inner, bad_outer), mode)
    error = caught(fn, params, hparams)
    assert isinstance(error, km.InputMismatchError)
    assert "outer_loss" in str(error)
    assert f"outer_batch[0] has shape ({len(x_val)}, 4)" in str(error)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_hyperparameter_with_extra_unit_axis_broadcasts_as_the_loss_says(mode):
    # Documented broadcast rule, pinned. Ridge's penalty 1/2 sum_j exp(h_j) w_j^2 with h of
    # shape (d, 1) is 1/2 sum_ij exp(h_i) w_j^2 = 1/2 exp(s) ||w||^2 with s = logsumexp(h).
    # Reference: the hypergradient of that scalar-s problem, through ds/dh = softmax(h).
    ridge, params, _, inner, outer = ridge_inputs()
    h = np.array([[-1.0], [-0.5], [0.2]])
    s = np.log(np.sum(np.exp(h)))
    estimator = km.Unrolled(optim.sgd(0.1), num_steps=3)
    fn = compiled(lambda p, hp: estimator(ridge.problem(), p, hp, inner, outer), mode)
    got = fn(params, [h]).hypergrad[0]
    assert got.shape == (3, 1)
    scalar = fn(params, [np.float64(s)]).hypergrad[0]
    softmax = np.exp(h) / np.sum(np.exp(h))
    np.testing.assert_allclose(got, float(scalar) * softmax, rtol=1e-12)


@tf.custom_gradient
def stretched_identity(h):
    """h, with a gradient of the wrong shape: broadcast from (3, 1) to (3, 3)."""
    return tf.identity(h), lambda dy: tf.broadcast_to(dy, [3, 3])


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", ["unrolled", "implicit", "evograd", "sama"])
def test_hypergradient_of_another_shape_than_its_leaf_is_refused(name, mode):
    # Reverse-mode estimators take the custom gradient as given (Forward's JVPs never use it).
    estimator = TRACED_ESTIMATORS[name]()
    ridge, params, _, inner, outer = ridge_inputs()
    problem = km.BilevelProblem(
        lambda p, h, b: ridge.inner(p, [tf.reduce_mean(stretched_identity(h[0]), 1)], b),
        ridge.outer)
    fn = compiled(lambda p, h: estimator(problem, p, h, inner, outer), mode)
    error = caught(fn, params, [np.full((3, 1), -1.0)])
    assert isinstance(error, km.InputMismatchError)
    assert "hparams[0]" in str(error) and "(3, 3)" in str(error) and "(3, 1)" in str(error)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_ptft_finetune_batch_that_does_not_fit_is_named(mode):
    problem = ptft_toy.PROBLEM
    x_val = np.concatenate([ptft_toy.X_MV, ptft_toy.X_MV[:, :1]], axis=1)  # 3 inputs, encoder 2
    estimator = km.PTFT(optim.sgd(ptft_toy.FT_LR), solve=km.linalg.neumann(1, 0.05))
    fn = compiled(lambda params, phi: estimator(
        problem, params, phi, (ptft_toy.X_PT, ptft_toy.Y_PT),
        ((ptft_toy.X_MT, ptft_toy.Y_MT), (x_val, ptft_toy.Y_MV))), mode)
    error = caught(fn, (ptft_toy.THETA_E, ptft_toy.THETA_H, ptft_toy.PSI), [ptft_toy.PHI])
    assert isinstance(error, km.InputMismatchError)
    assert "ft_loss" in str(error)
    assert f"outer_batch.val[0] has shape ({len(x_val)}, 3)" in str(error)
