"""Implicit (IFT) hypergradients on ridge regression.

Reference: tests.references.ridge_hypergradient, the closed-form
d L_val(w*(lambda)) / d log(lambda) in float64 NumPy.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt.hypergrad.implicit import scaled_product
from tests import references
from tests.conftest import compiled, rel_err


def solve(ridge, estimator, log_lam, mode="eager", dtype=np.float64):
    truth, w_star = references.ridge_hypergradient(ridge.x, ridge.y, ridge.x_val, ridge.y_val,
                                                   np.exp(log_lam))
    inner_batch, outer_batch = ridge.batches(dtype)
    fn = compiled(lambda p, h: estimator(ridge.problem(), p, h, inner_batch, outer_batch), mode)
    result = fn([w_star.astype(dtype)], [np.asarray(log_lam, dtype)])
    return result, truth


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("per_feature", [True, False])
def test_ift_matches_ridge_closed_form(solver, mode, per_feature, ridge):
    log_lam = ridge.log_lam if per_feature else np.float64(-0.7)
    estimator = km.Implicit({"cg": km.linalg.cg(50, 1e-14), "exact": km.linalg.dense()}[solver])
    result, truth = solve(ridge, estimator, log_lam, mode)
    assert rel_err(result.hypergrad[0], truth) < 1e-5
    np.testing.assert_array_equal(result.direct[0], 0.0)  # L_val does not depend on lambda
    assert bool(result.is_finite)


def test_neumann_error_falls_as_terms_grow(ridge):
    # alpha = 1 / lambda_max(H) keeps the series convergent; H from the closed form.
    _, h = references.ridge_solution(ridge.x, ridge.y, np.exp(ridge.log_lam))
    alpha = 1.0 / np.linalg.eigvalsh(h).max()
    errors = []
    for terms in (1, 4, 16, 64, 256):
        result, truth = solve(ridge, km.Implicit(km.linalg.neumann(terms, alpha)),
                              ridge.log_lam)
        errors.append(rel_err(result.hypergrad[0], truth))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


def test_float32_cg_close_to_closed_form(ridge):
    result, truth = solve(ridge, km.Implicit(km.linalg.cg(50, 1e-6)),
                          ridge.log_lam, "xla", np.float32)
    assert result.hypergrad[0].dtype == np.float32
    assert rel_err(result.hypergrad[0], truth) < 1e-3


def test_forward_over_reverse_hvps_give_the_ridge_closed_form(ridge):
    # Reference: tests.references.ridge_hypergradient (closed form), with CG on HVPs computed
    # forward-over-reverse.
    truth, w_star = references.ridge_hypergradient(ridge.x, ridge.y, ridge.x_val, ridge.y_val,
                                                   np.exp(ridge.log_lam))
    inner, outer = ridge.batches()
    result = km.Implicit(km.linalg.cg(50, 1e-14), hvp_mode="forward_over_reverse")(
        ridge.problem(), [w_star], [ridge.log_lam], inner, outer)
    np.testing.assert_allclose(result.hypergrad[0], truth, rtol=1e-8)


@pytest.mark.parametrize("norm", [None, 1e-3, 2.0 ** 15])
def test_scaled_product_equals_the_linear_map(norm):
    # Reference: A v in float64 NumPy (the rescaling is exact in exact arithmetic).
    rng = np.random.default_rng(0)
    a, v = rng.normal(size=(5, 5)), rng.normal(size=5) * 1e-4
    got = scaled_product(lambda u: [tf.linalg.matvec(tf.constant(a), u[0]), None],
                         [tf.constant(v)], norm)
    assert rel_err(got[0], a @ v) < 1e-12 and got[1] is None
    zero = scaled_product(lambda u: [tf.linalg.matvec(tf.constant(a), u[0])],
                          [tf.zeros(5, tf.float64)], norm)
    np.testing.assert_array_equal(zero[0], 0.0)


def test_ridge_with_outer_loss_scale_matches_closed_form(ridge):
    # Reference: the closed form; the scale goes into the CG's products and out again.
    truth, w_star = references.ridge_hypergradient(ridge.x, ridge.y, ridge.x_val, ridge.y_val,
                                                   np.exp(ridge.log_lam))
    inner, outer = ridge.batches(np.float64)
    problem = dataclasses.replace(ridge.problem(), outer_loss_scale=2.0 ** 15)
    result = km.Implicit(km.linalg.cg(50, 1e-14))(problem, [w_star], [ridge.log_lam], inner,
                                                  outer)
    assert rel_err(result.hypergrad[0], truth) < 1e-8
