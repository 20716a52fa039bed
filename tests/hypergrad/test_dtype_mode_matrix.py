"""Every estimator, eagerly and under XLA, in float32 and float64.

References: central finite differences (float64) of the closed-form quadratic iterate for
Unrolled and Forward; the closed-form ridge hypergradient for Implicit; for EvoGrad, the
float64 eager value of the same draw (same stateless seed), since its expectation is the
reference checked in test_evograd.py.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests import references
from tests.conftest import Ridge, compiled, rel_err
from tests.hypergrad.quadratic import Quadratic

TOLERANCE = {np.float32: 2e-4, np.float64: 1e-8}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("kind", ["unrolled", "forward"])
def test_unrolled_and_forward(kind, mode, dtype):
    quad = Quadratic(num_steps=8)
    params, hparams, inner_batch, target = quad.inputs(dtype)
    cls = km.Unrolled if kind == "unrolled" else km.Forward
    estimator = cls(optim.sgd(1.0), 8)
    result = compiled(lambda p, h: estimator(quad.problem(), p, h, inner_batch, target), mode)(
        params, hparams)
    for got, ref in zip(result.hypergrad, quad.finite_difference(quad.outer_after)):
        assert got.dtype == dtype
        assert rel_err(got, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_implicit(mode, dtype):
    ridge = Ridge()
    truth, w_star = references.ridge_hypergradient(ridge.x, ridge.y, ridge.x_val, ridge.y_val,
                                                   np.exp(ridge.log_lam))
    inner, outer = ridge.batches(dtype)
    estimator = km.Implicit(km.linalg.cg(30, 1e-12))
    result = compiled(lambda p, h: estimator(ridge.problem(), p, h, inner, outer), mode)(
        [w_star.astype(dtype)], [ridge.log_lam.astype(dtype)])
    assert result.hypergrad[0].dtype == dtype
    assert rel_err(result.hypergrad[0], truth) < TOLERANCE[dtype] * 10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_evograd(mode, dtype):
    ridge = Ridge()
    estimator = km.EvoGrad(num_copies=3, sigma=0.05, temperature=0.5)
    seed = tf.constant([4, 2], tf.int64)

    def run(dt, m):
        inner, outer = ridge.batches(dt)
        return compiled(lambda p, h: estimator(ridge.problem(), p, h, inner, outer, seed=seed), m)(
            [np.zeros(6, dt)], [ridge.log_lam.astype(dt)]).hypergrad[0]

    got = run(dtype, mode)
    assert got.dtype == dtype and np.all(np.isfinite(got))
    assert rel_err(got, run(np.float64, mode)) < (2e-3 if dtype == np.float32 else 1e-10)
