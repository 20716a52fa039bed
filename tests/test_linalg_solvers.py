"""The solver protocol: solve(hvp_fn, b, *, step_size=None, unroll=False) -> x ~ H^-1 b.

Reference: numpy.linalg.solve on a random SPD matrix (float64), and for Neumann the
truncated series alpha sum_{j<=i} (I - alpha H)^j b written out in NumPy.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt import linalg


def spd(n=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    h = a @ a.T / n + np.eye(n)
    return h, rng.normal(size=n)


def numpy_neumann(h, b, alpha, terms):
    term, total = b.copy(), b.copy()
    for _ in range(terms):
        term = term - alpha * h @ term
        total = total + term
    return alpha * total


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("solver", ["neumann", "cg", "dense"])
def test_every_solver_takes_the_same_call(solver, unroll):
    h, b = spd()
    hvp_fn = lambda v: [tf.linalg.matvec(tf.constant(h), v[0])]  # noqa: E731
    alpha = 1.0 / np.linalg.eigvalsh(h).max()
    solve = {"neumann": linalg.neumann(7), "cg": linalg.cg(20, 1e-14),
             "dense": linalg.dense()}[solver]
    x = tf.function(lambda b_: solve(hvp_fn, [b_], step_size=alpha, unroll=unroll))(
        tf.constant(b))[0].numpy()
    reference = (numpy_neumann(h, b, alpha, 7) if solver == "neumann"
                 else np.linalg.solve(h, b))
    np.testing.assert_allclose(x, reference, rtol=1e-9, atol=1e-12)


def test_neumann_alpha_given_wins_over_step_size_and_none_needs_one():
    h, b = spd()
    hvp_fn = lambda v: [tf.linalg.matvec(tf.constant(h), v[0])]  # noqa: E731
    x = linalg.neumann(3, alpha=0.1)(hvp_fn, [tf.constant(b)], step_size=0.5)[0].numpy()
    np.testing.assert_allclose(x, numpy_neumann(h, b, 0.1, 3), rtol=1e-12)
    with pytest.raises(ValueError, match="learning rate"):
        linalg.neumann(3)(hvp_fn, [tf.constant(b)])


def test_bad_solver_settings_are_named():
    with pytest.raises(ValueError, match="num_terms"):
        linalg.neumann(-1)
    with pytest.raises(ValueError, match="alpha"):
        linalg.neumann(2, alpha=0.0)
    with pytest.raises(ValueError, match="max_iterations"):
        linalg.cg(-2)


@pytest.mark.parametrize("unroll", [False, True])
def test_max_eigenvalue_matches_numpy(unroll):
    # Reference: numpy.linalg.eigvalsh; a spectrum with a clear gap, so 60 iterations suffice.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    h = q @ np.diag([5.0, 2.0, 1.0, 0.5, 0.3, 0.1]) @ q.T
    hvp_fn = lambda v: [tf.linalg.matvec(tf.constant(h), v[0])]  # noqa: E731
    got = tf.function(lambda: linalg.max_eigenvalue(hvp_fn, [tf.zeros(6, tf.float64)], 60,
                                                    unroll=unroll))()
    assert float(got) == pytest.approx(np.linalg.eigvalsh(h).max(), rel=1e-9)
    indefinite = q @ np.diag([-4.0, 2.0, 1.0, 0.5, 0.3, 0.1]) @ q.T
    got = linalg.max_eigenvalue(lambda v: [tf.linalg.matvec(tf.constant(indefinite), v[0])],
                                [tf.zeros(6, tf.float64)], 60)
    assert float(got) == pytest.approx(-4.0, rel=1e-9)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_forward_over_reverse_hvp_equals_the_explicit_hessian(mode):
    # Reference: the explicit Hessian of a non-quadratic loss by tf jacobian (float64).
    from tests.conftest import compiled
    rng = np.random.default_rng(2)
    a = tf.constant(rng.normal(size=(5, 3)))

    def loss(p):
        return tf.reduce_sum(tf.math.log(tf.cosh(tf.linalg.matvec(a, p[0])))) + tf.reduce_sum(p[1] ** 4)

    params = [tf.constant(rng.normal(size=3)), tf.constant(rng.normal(size=2))]
    v = [tf.constant(rng.normal(size=3)), tf.constant(rng.normal(size=2))]
    with tf.GradientTape() as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            value = loss(params)
        flat = tf.concat(inner.gradient(value, params), 0)
    hessian = np.concatenate([j.numpy() for j in outer.jacobian(flat, params)], 1)
    expected = hessian @ np.concatenate([x.numpy() for x in v])
    for hvp_mode in linalg.HVP_MODES:
        got = compiled(lambda p, u: linalg.hvp(loss, p, u, mode=hvp_mode), mode)(params, v)
        np.testing.assert_allclose(np.concatenate([g.numpy() for g in got]), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="mode"):
        linalg.hvp(loss, params, v, mode="forward")
