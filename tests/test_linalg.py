"""keras_metapt.linalg against explicit matrices (NumPy, float64)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt import linalg
from tests.conftest import compiled, rel_err

RNG = np.random.default_rng(0)
D = 6
M = RNG.normal(size=(D, D))
A = M @ M.T / D + np.eye(D)  # symmetric positive definite
X0 = RNG.normal(size=D)
V = RNG.normal(size=D)


def loss(params):
    # f(x) = 1/2 x^T A x + sum(sin x):  Hessian = A - diag(sin x).
    x = params[0]
    return 0.5 * tf.tensordot(x, tf.linalg.matvec(tf.constant(A), x), 1) + tf.reduce_sum(tf.sin(x))


def hessian_at(x):
    return A - np.diag(np.sin(x))


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_hvp_equals_explicit_hessian_times_vector(mode):
    got = compiled(lambda x, v: linalg.hvp(loss, [x], [v])[0], mode)(tf.constant(X0), tf.constant(V))
    np.testing.assert_allclose(got.numpy(), hessian_at(X0) @ V, rtol=1e-12)


def test_mixed_vjp_equals_closed_form():
    # L(x, phi) = sum(phi * x^2) + phi_0 * x_1:  d/dphi <dL/dx, v> = 2 x * v, plus x-term v_1 in entry 0.
    def lossxp(params, hparams):
        x, phi = params[0], hparams[0]
        return tf.reduce_sum(phi * x ** 2) + phi[0] * x[1]
    phi = tf.constant(RNG.normal(size=D))
    got = linalg.mixed_vjp(lossxp, [tf.constant(X0)], [phi], [tf.constant(V)])[0].numpy()
    expected = 2 * X0 * V
    expected[0] += V[1]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_mixed_vjp_returns_none_for_unconnected_hparam():
    def lossxp(params, hparams):
        return tf.reduce_sum(params[0] ** 2) + hparams[1] * 0.0 + tf.reduce_sum(hparams[0])
    out = linalg.mixed_vjp(lossxp, [tf.constant(X0)], [tf.constant(V), tf.constant(1.0, tf.float64)],
                           [tf.constant(V)])
    assert out[0] is None and out[1] is None  # neither enters dL/dx


def test_neumann_error_falls_with_terms_and_converges():
    # Reference: A^-1 v by numpy.linalg.solve. alpha = 1 / lambda_max keeps the series convergent.
    exact = np.linalg.solve(A, V)
    alpha = 1.0 / np.linalg.eigvalsh(A).max()

    def hvp_fn(v):
        return [tf.linalg.matvec(tf.constant(A), v[0])]

    errors = [np.linalg.norm(linalg.neumann_inverse_hvp(hvp_fn, [tf.constant(V)], alpha, i)[0].numpy()
                             - exact) for i in (0, 2, 5, 10, 20, 40, 200)]
    assert all(b < a for a, b in zip(errors[:-1], errors[1:-1])), errors
    assert errors[-1] < 1e-8 * np.linalg.norm(exact)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_conjugate_gradient_solves_spd_system(mode):
    # Reference: numpy.linalg.solve; CG is exact after D iterations in exact arithmetic.
    def solve(b):
        return linalg.conjugate_gradient(
            lambda v: [tf.linalg.matvec(tf.constant(A), v[0])], [b], max_iterations=3 * D,
            tolerance=1e-14)[0]
    got = compiled(solve, mode)(tf.constant(V)).numpy()
    np.testing.assert_allclose(got, np.linalg.solve(A, V), rtol=1e-10)


def test_conjugate_gradient_stops_at_tolerance():
    # Counts HVPs: with a loose tolerance CG stops before max_iterations.
    calls = []

    def hvp_fn(v):
        calls.append(1)
        return [tf.linalg.matvec(tf.constant(np.diag(np.arange(1.0, 101.0))), v[0])]

    b = tf.constant(np.ones(100))
    linalg.conjugate_gradient(hvp_fn, [b], max_iterations=100, tolerance=1e-1)
    assert 1 <= len(calls) < 100


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_dense_inverse_hvp_matches_numpy_solve(mode):
    got = compiled(lambda x, v: linalg.dense_inverse_hvp(lambda u: linalg.hvp(loss, [x], u), [v])[0], mode)(
        tf.constant(X0), tf.constant(V))
    np.testing.assert_allclose(got.numpy(), np.linalg.solve(hessian_at(X0), V), rtol=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_conjugate_gradient_propagates_nan(mode, bad):
    # A NaN or inf right-hand side (an overflowed, loss-scaled gradient) must not come back
    # as the (finite) initial guess.
    b = tf.constant([1.0, bad, 0.0, 0.0, 0.0, 0.0], tf.float64)
    x = compiled(lambda b: linalg.conjugate_gradient(
        lambda v: [tf.linalg.matvec(tf.constant(A), v[0])], [b])[0], mode)(b)
    assert not np.all(np.isfinite(x.numpy()))


def test_conjugate_gradient_stops_at_negative_curvature():
    # H = diag(1, -1), b = (1, 1): the first direction b has b^T H b = 0 -> stop, x = 0, 1 HVP.
    # Reference: the truncated-CG rule (return the iterate reached before non-positive curvature).
    h = tf.constant(np.diag([1.0, -1.0]))
    x, k = linalg.conjugate_gradient_with_info(lambda v: [tf.linalg.matvec(h, v[0])],
                                               [tf.constant([1.0, 1.0], tf.float64)], 10)
    assert int(k) == 1
    np.testing.assert_array_equal(x[0].numpy(), [0.0, 0.0])
    # H = diag(2, -1), b = (1, 0.5): curvature 2 - 0.25 > 0 for the first step, then negative.
    h2 = tf.constant(np.diag([2.0, -1.0]))
    x, k = linalg.conjugate_gradient_with_info(lambda v: [tf.linalg.matvec(h2, v[0])],
                                               [tf.constant([1.0, 0.5], tf.float64)], 10)
    assert np.all(np.isfinite(x[0].numpy())) and int(k) == 2


def numpy_cg(h, b, iterations):
    """Plain CG, no curvature check or tolerance: the fixed-count reference."""
    x, r = np.zeros_like(b), b.copy()
    p, rs = r.copy(), r @ r
    for _ in range(iterations):
        hp = h @ p
        step = rs / (p @ hp)
        x, r = x + step * p, r - step * hp
        rs_new = r @ r
        p, rs = r + rs_new / rs * p, rs_new
    return x


# Symmetric indefinite, well conditioned: eigenvalues +-1, +-2, +-3 in a random basis.
_Q = np.linalg.qr(RNG.normal(size=(D, D)))[0]
INDEFINITE = _Q @ np.diag([1.0, 2.0, 3.0, -1.0, -2.0, -3.0]) @ _Q.T


@pytest.mark.parametrize("mode, unroll", [("eager", False), ("eager", True), ("xla", False)])
def test_fixed_iteration_cg_matches_numpy_cg(mode, unroll):
    # Reference: numpy_cg above after n iterations (n < D: not yet converged), and
    # numpy.linalg.solve after D iterations (CG is exact then for a nonsingular symmetric
    # matrix without breakdown, definite or not). On SPD A both settings agree.
    def run(h, n, stop):
        solver = linalg.cg(n, tolerance=0.0, stop_on_negative_curvature=stop)
        hvp_fn = lambda v: [tf.linalg.matvec(tf.constant(h), v[0])]  # noqa: E731
        return compiled(lambda b: solver.solve_with_info(hvp_fn, [b], unroll=unroll), mode)(
            tf.constant(V))

    for n in (1, 3):
        for stop in (True, False):
            x, k = run(A, n, stop)
            assert int(k) == n
            np.testing.assert_allclose(x[0].numpy(), numpy_cg(A, V, n), rtol=1e-10)
    x, k = run(INDEFINITE, 4, False)
    assert int(k) == 4  # every iteration runs on the indefinite matrix
    np.testing.assert_allclose(x[0].numpy(), numpy_cg(INDEFINITE, V, 4), rtol=1e-8)
    x, k = run(INDEFINITE, D, False)
    np.testing.assert_allclose(x[0].numpy(), np.linalg.solve(INDEFINITE, V), rtol=1e-8)
    _, k_stop = run(INDEFINITE, 4, True)
    assert int(k_stop) < 4  # the default stops at the first non-positive curvature


def test_fixed_iteration_cg_survives_zero_curvature_and_keeps_the_protocol():
    # H = diag(1, -1), b = (1, 1): every direction has p^T H p = 0 (breakdown); the
    # fixed-count run takes no step there and stays finite (reference: x = 0).
    h = tf.constant(np.diag([1.0, -1.0]))
    hvp_fn = lambda v: [tf.linalg.matvec(h, v[0])]  # noqa: E731
    solver = linalg.cg(5, tolerance=0.0, stop_on_negative_curvature=False)
    x, k = solver.solve_with_info(hvp_fn, [tf.constant([1.0, 1.0], tf.float64)])
    assert int(k) == 5
    np.testing.assert_array_equal(x[0].numpy(), [0.0, 0.0])
    # The protocol call is unchanged and returns only x.
    x = solver(hvp_fn, [tf.constant([1.0, 1.0], tf.float64)], step_size=0.1, unroll=True)
    np.testing.assert_array_equal(x[0].numpy(), [0.0, 0.0])


def test_conjugate_gradient_on_float16_vectors_beyond_a_float16_squared_norm():
    """float16 vectors of norm 400 (their squared norm, 1.6e5, overflows float16): the inner
    products are taken in float32. Reference: NumPy's float64 solve of the SPD A, to float16
    precision (the HVP itself runs in float16)."""
    b = 400.0 * V / np.linalg.norm(V)
    a16 = tf.constant(A, tf.float16)
    x = linalg.conjugate_gradient(lambda v: [tf.linalg.matvec(a16, v[0])],
                                  [tf.constant(b, tf.float16)], max_iterations=2 * D,
                                  tolerance=1e-3)[0]
    assert x.dtype == tf.float16
    assert rel_err(x.numpy().astype(np.float64), np.linalg.solve(A, b)) < 2e-2
