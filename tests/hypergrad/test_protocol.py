"""One estimator protocol (keras_metapt.hypergrad's docstring), checked over every estimator.

Reference: the protocol as written there: construction keywords gradient_reduction and
check_finite; call (problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
seed=None); a HypergradResult; a clear ValueError where an estimator cannot honour one.
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import Ridge

CALL = ["self", "problem", "params", "hparams", "inner_batch", "outer_batch", "opt_state", "seed"]


def ridge_case():
    ridge = Ridge()
    inner, outer = ridge.batches()
    return ridge.problem(), [np.zeros(6)], [ridge.log_lam], inner, outer


def ptft_case():
    def pt_loss(theta_e, theta_h, phi, batch):
        x, y = batch
        pred = tf.linalg.matvec(x, theta_e[0]) * theta_h[0]
        return tf.reduce_mean(tf.exp(phi[0]) * (pred - y) ** 2) + 0.1 * tf.reduce_sum(theta_e[0] ** 2)

    def ft_loss(theta_e, psi, batch):
        x, y = batch
        return tf.reduce_mean((tf.linalg.matvec(x, theta_e[0]) * psi[0] - y) ** 2)

    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 3)), rng.normal(size=8))
    params = km.PTFTParams([rng.normal(size=3)], [np.float64(1.0)], [np.float64(0.5)])
    return (km.PretrainFinetuneProblem(pt_loss, ft_loss, pt_learning_rate=0.05), params,
            [np.float64(0.2)], batch, km.hypergrad.FinetuneBatches(batch, batch))


ESTIMATORS = {
    "unrolled": (lambda **kw: km.Unrolled(optim.sgd(0.1), 3, **kw), ridge_case),
    "forward": (lambda **kw: km.Forward(optim.sgd(0.1), 3, **kw), ridge_case),
    "reversible": (lambda **kw: km.Reversible(3, **kw), ridge_case),
    "implicit": (lambda **kw: km.Implicit(km.linalg.cg(5), **kw), ridge_case),
    "evograd": (lambda **kw: km.EvoGrad(3, sigma=0.1, temperature=0.5, **kw), ridge_case),
    "sama": (lambda **kw: km.SAMA(optim.sgd(0.1), **kw), ridge_case),
    "ptft": (lambda **kw: km.PTFT(optim.sgd(0.1), 2, km.linalg.neumann(2), **kw), ptft_case),
    # online: started at the run's initial weights (those of ridge_case), one reference per call
    "hyperdistill": (lambda **kw: km.HyperDistill(optim.sgd(0.1), 0.9, distill_every=1, **kw)
                     .start([np.zeros(6)]), ridge_case),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_follows_the_protocol(name):
    make, case = ESTIMATORS[name]
    estimator = make(check_finite=True, gradient_reduction=None)
    assert isinstance(estimator, km.hypergrad.Estimator)
    signature = inspect.signature(type(estimator).__call__)
    assert list(signature.parameters) == CALL
    for keyword in ("opt_state", "seed"):
        assert signature.parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert signature.parameters[keyword].default is None
    init = inspect.signature(type(estimator).__init__).parameters
    for keyword, default in (("gradient_reduction", None), ("check_finite", True)):
        assert init[keyword].kind is inspect.Parameter.KEYWORD_ONLY and init[keyword].default == default

    problem, params, hparams, inner, outer = case()
    result = estimator(problem, params, hparams, inner, outer, opt_state=None,
                       seed=tf.constant([1, 2], tf.int64))
    assert isinstance(result, km.HypergradResult)
    assert bool(result.is_finite)
    for got, h in zip(result.hypergrad, hparams):
        assert got.shape == np.shape(h)


def test_forward_refuses_gradient_reduction_by_name():
    with pytest.raises(ValueError, match="Forward runs on one replica"):
        km.Forward(optim.sgd(0.1), 3, gradient_reduction=km.distribute.replica_sum)
    with pytest.raises(ValueError, match="Reversible runs on one replica"):
        km.Reversible(3, gradient_reduction=km.distribute.replica_sum)
    with pytest.raises(ValueError, match="HyperDistill runs on one replica"):
        km.HyperDistill(optim.sgd(0.1), gradient_reduction=km.distribute.replica_sum)


def test_estimators_without_steps_return_opt_state_unchanged():
    problem, params, hparams, inner, outer = ridge_case()
    state = {"marker": tf.constant(7.0)}
    for estimator in (km.Implicit(km.linalg.cg(3)), km.EvoGrad(2, sigma=0.1, temperature=1.0),
                      km.SAMA()):
        assert estimator(problem, params, hparams, inner, outer, opt_state=state).opt_state is state


def test_implicit_neumann_without_alpha_uses_the_problems_learning_rate():
    # Reference: the same estimator with alpha given explicitly.
    problem, params, hparams, inner, outer = ridge_case()
    explicit = km.Implicit(km.linalg.neumann(4, alpha=0.3))(problem, params, hparams, inner, outer)
    with_lr = km.BilevelProblem(problem.inner_loss, problem.outer_loss, inner_learning_rate=0.3)
    implied = km.Implicit(km.linalg.neumann(4))(with_lr, params, hparams, inner, outer)
    np.testing.assert_allclose(implied.hypergrad[0], explicit.hypergrad[0], rtol=1e-12)
    with pytest.raises(ValueError, match="learning rate"):
        km.Implicit(km.linalg.neumann(4))(problem, params, hparams, inner, outer)
