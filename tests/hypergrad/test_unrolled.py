"""Unrolled (reverse-mode) hypergradients on gradient descent over a quadratic.

Reference: central finite differences (float64) of the closed-form iterate w_T
(tests.references.quadratic_gd_iterate); for truncation, of the K-step formula
with w_{T-K} held fixed.
"""

import numpy as np
import pytest

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import compiled, rel_err
from tests.hypergrad.quadratic import GAMMA, Quadratic


def run(estimator, quad, mode, dtype=np.float64):
    params, hparams, inner_batch, target = quad.inputs(dtype)
    problem = quad.problem()
    fn = compiled(lambda p, h: estimator(problem, p, h, inner_batch, target), mode)
    return fn(params, hparams)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("per_step_b", [False, True])
def test_full_unroll_matches_finite_differences(mode, per_step_b):
    quad = Quadratic(num_steps=12, per_step_b=per_step_b)
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=12), quad, mode)
    fd = quad.finite_difference(quad.outer_after)
    for got, ref in zip(result.hypergrad, fd):
        assert rel_err(got, ref) < 1e-6
    # direct term: d/dc of gamma/2 ||c||^2 at fixed w_T; none for the learning rates.
    np.testing.assert_allclose(result.direct[0], GAMMA * quad.c, rtol=1e-12)
    np.testing.assert_array_equal(result.direct[1], 0.0)
    np.testing.assert_allclose(result.params[0], quad.iterate(quad.c, quad.lr, 12), rtol=1e-12)
    assert bool(result.is_finite)


@pytest.mark.parametrize("truncate", [1, 3])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_truncated_unroll_equals_k_step_formula(truncate, mode):
    quad = Quadratic(num_steps=10)
    T = 10
    w_start = quad.iterate(quad.c, quad.lr, T - truncate)  # held fixed by truncation
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=T, truncate=truncate), quad, mode)
    fd = quad.finite_difference(
        lambda c, lr: quad.outer_after(c, lr, start=T - truncate, w_start=w_start))
    for got, ref in zip(result.hypergrad, fd):
        assert rel_err(got, ref) < 1e-6
    # and it really differs from the full hypergradient (the test would otherwise be vacuous)
    full = quad.finite_difference(quad.outer_after)
    assert rel_err(result.hypergrad[0], full[0]) > 1e-3


def test_float32_close_to_float64_reference():
    quad = Quadratic(num_steps=12)
    result = run(km.Unrolled(optim.sgd(1.0), num_steps=12), quad, "xla", np.float32)
    fd = quad.finite_difference(quad.outer_after)
    for got, ref in zip(result.hypergrad, fd):
        assert got.dtype == np.float32
        assert rel_err(got, ref) < 1e-4
