"""SAMA-style first-order hypergradients.

References: the ridge closed form (tests.references.ridge_hypergradient) where SAMA's
approximation is exact (H = I / lr under SGD at rate lr); elsewhere SAMA's own formula
-M (P g) + direct written out in NumPy for ridge (M = diag(exp(h) w), P = lr I, and for Adam
the derivative of the Adam step with respect to the gradient, transcribed by hand); the exact
mixed VJP (linalg.mixed_vjp) for the finite difference's O(eps^2) error.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import linalg, optim
from keras_metapt.hypergrad import finite_difference_mixed_vjp
from keras_metapt.hypergrad.sama import first_order_indirect_term, optimizer_preconditioned
from tests import references
from tests.conftest import Ridge, rel_err


def isotropic_ridge(d=5, n=40, seed=0):
    """Ridge whose Gram matrix is 2 I, with one scalar log-penalty h: H = (2 + e^h) I."""
    ridge = Ridge(n=n, d=d, seed=seed)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, d)))
    ridge.x = q * np.sqrt(2.0 * n)
    ridge.log_lam = np.array([-0.5])
    return ridge


def test_exact_where_the_optimizer_jacobian_is_the_inverse_hessian():
    ridge = isotropic_ridge()
    lam = np.exp(ridge.log_lam[0])
    truth, w_star = references.ridge_hypergradient(ridge.x, ridge.y, ridge.x_val, ridge.y_val,
                                                   np.full(5, lam))
    inner, outer = ridge.batches()

    def problem_inner(p, h, b):  # the same penalty on every feature, one hyperparameter
        return Ridge.inner(p, [tf.fill([5], h[0][0])], b)

    problem = km.BilevelProblem(problem_inner, Ridge.outer)
    result = km.SAMA(optim.sgd(1.0 / (2.0 + lam)))(problem, [w_star], [ridge.log_lam], inner, outer)
    # d/dh with lambda_j = e^h for all j: sum_j d/dlog(lambda_j)
    assert rel_err(result.hypergrad[0][0], np.sum(truth)) < 1e-8


def test_ridge_equals_samas_formula_with_sgd():
    ridge = Ridge()
    inner, outer = ridge.batches()
    w = np.random.default_rng(3).normal(size=6)
    lr = 0.07
    result = km.SAMA(optim.sgd(lr))(ridge.problem(), [w], [ridge.log_lam], inner, outer)
    g_val = ridge.x_val.T @ (ridge.x_val @ w - ridge.y_val) / len(ridge.y_val)
    expected = -np.exp(ridge.log_lam) * w * (lr * g_val)
    assert rel_err(result.hypergrad[0], expected) < 1e-9


def test_adam_preconditioner_is_the_derivative_of_the_adam_step():
    ridge = Ridge()
    inner, outer = ridge.batches()
    rng = np.random.default_rng(4)
    w = rng.normal(size=6)
    count, m_old, v_old = 4, 0.1 * rng.normal(size=6), 0.05 * rng.random(6) + 0.01
    lr, b1, b2, eps, eps_root = 0.05, 0.9, 0.999, 1e-8, 1e-8
    state = (tf.constant(count), tf.constant(m_old), tf.constant(v_old))
    result = km.SAMA(optim.adam(lr, b1, b2, eps, eps_root))(
        ridge.problem(), [w], [ridge.log_lam], inner, outer, opt_state=state)
    lam = np.exp(ridge.log_lam)
    g = ridge.x.T @ (ridge.x @ w - ridge.y) / len(ridge.y) + lam * w   # inner gradient
    t = count + 1
    m = b1 * m_old + (1 - b1) * g
    v = b2 * v_old + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    s = np.sqrt(v_hat + eps_root)
    dstep = (1 - b1) / (1 - b1 ** t) / (s + eps) \
        - m_hat / (s + eps) ** 2 / (2 * s) * (1 - b2) * 2 * g / (1 - b2 ** t)
    g_val = ridge.x_val.T @ (ridge.x_val @ w - ridge.y_val) / len(ridge.y_val)
    expected = -lam * w * (lr * dstep * g_val)
    assert rel_err(result.hypergrad[0], expected) < 1e-7


ADAM = dict(count=3, lr=0.05, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-8)


def three_leaf_problem(seed=6):
    """Nested parameters of three leaves and L(p, h) = e^h sum_i a_i p_i^2 / 2 (gradient
    e^h a p; M v = d/dh <grad, v> = e^h sum a p v, which the central difference gets exactly),
    with Adam moments for every leaf."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 2), (4,), (2, 2)]
    params = ([tf.constant(rng.normal(size=shapes[0]))],
              (tf.constant(rng.normal(size=shapes[1])), tf.constant(rng.normal(size=shapes[2]))))
    curvature = [rng.random(s) + 0.5 for s in shapes]

    def inner(p, h):
        return 0.5 * tf.add_n([tf.reduce_sum(a * x ** 2) * tf.exp(h[0])
                               for a, x in zip(curvature, tf.nest.flatten(p))])

    m_old = [0.1 * rng.normal(size=s) for s in shapes]
    v_old = [0.05 * rng.random(s) + 0.01 for s in shapes]
    return params, curvature, inner, m_old, v_old, rng


def adam_preconditioned(g, m_old, v_old, vector):
    """The derivative of the Adam step with respect to the gradient times ``vector``,
    written out (as in the test above), leaf by leaf."""
    count, lr, b1, b2, eps, eps_root = (ADAM[k] for k in
                                        ("count", "lr", "b1", "b2", "eps", "eps_root"))
    t = count + 1
    out = []
    for gi, m0, v0, vi in zip(g, m_old, v_old, vector):
        m_hat = (b1 * m0 + (1 - b1) * gi) / (1 - b1 ** t)
        s_ = np.sqrt((b2 * v0 + (1 - b2) * gi * gi) / (1 - b2 ** t) + eps_root)
        dstep = ((1 - b1) / (1 - b1 ** t) / (s_ + eps)
                 - m_hat / (s_ + eps) ** 2 / (2 * s_) * (1 - b2) * 2 * gi / (1 - b2 ** t))
        out.append(lr * dstep * vi)
    return out


def nest_like(params, flat):
    return tf.nest.pack_sequence_as(params, [tf.constant(x) for x in flat])


def adam_and_state(params, m_old, v_old):
    return (optim.adam(*(ADAM[k] for k in ("lr", "b1", "b2", "eps", "eps_root"))),
            (tf.constant(ADAM["count"]), nest_like(params, m_old), nest_like(params, v_old)))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_preconditioner_leaf_by_leaf_equals_the_hand_derivatives(compiled, fuse):
    """Worked one leaf at a time (``elementwise``; each leaf's JVP one XLA function with
    ``fuse``, plain operations without) and in one JVP of the whole update: all equal the
    derivatives of the steps written out in NumPy (Adam: as above; heavy ball: lr; Nesterov:
    lr (1 + mu))."""
    params, curvature, inner, m_old, v_old, rng = three_leaf_problem()
    vector = tf.nest.map_structure(lambda p: tf.constant(rng.normal(size=p.shape)), params)
    hparams = [tf.constant(0.0, tf.float64)]
    flat_p = [x.numpy() for x in tf.nest.flatten(params)]
    flat_v = [x.numpy() for x in tf.nest.flatten(vector)]
    g = [a * x for a, x in zip(curvature, flat_p)]
    lr = ADAM["lr"]
    cases = [(*adam_and_state(params, m_old, v_old),
              adam_preconditioned(g, m_old, v_old, flat_v)),
             (optim.sgd(lr, momentum=0.5), nest_like(params, m_old), [lr * v for v in flat_v]),
             (optim.sgd(lr, momentum=0.5, nesterov=True), nest_like(params, m_old),
              [lr * 1.5 * v for v in flat_v]),
             (optim.sgd(lr), (), [lr * v for v in flat_v])]
    for optimizer, state, expected in cases:
        assert optimizer.elementwise
        for opt in (optimizer, optimizer._replace(elementwise=False)):
            def precondition(opt=opt, state=state):
                return optimizer_preconditioned(inner, params, hparams, vector, opt, state,
                                                fuse_update=fuse)
            got = tf.function(precondition)() if compiled else precondition()
            tf.nest.assert_same_structure(got, params)
            for x, want in zip(tf.nest.flatten(got), expected):
                np.testing.assert_allclose(x.numpy(), want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("compiled", [False, True])
def test_preconditioner_of_one_scalar_parameter(compiled):
    """One scalar parameter under Adam, whose step count is a scalar too (the per-leaf state
    must not take it for the moment): the NumPy derivative of the Adam step, as above."""
    rng = np.random.default_rng(9)
    p0, v0, m0, s0 = 0.7, rng.normal(), 0.1 * rng.normal(), 0.05 * rng.random() + 0.01
    params, vector = [tf.constant(p0, tf.float64)], [tf.constant(v0, tf.float64)]

    def inner(p, h):
        return 0.5 * 1.3 * p[0] ** 2 * tf.exp(h[0])

    adam, state = adam_and_state(params, [np.float64(m0)], [np.float64(s0)])
    expected = adam_preconditioned([1.3 * p0], [m0], [s0], [v0])[0]
    for fuse in (True, False):
        def precondition(fuse=fuse):
            return optimizer_preconditioned(inner, params, [tf.constant(0.0, tf.float64)],
                                            vector, adam, state, fuse_update=fuse)
        got = tf.function(precondition)() if compiled else precondition()
        np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-9)


HELD_FUSED_SCRIPT = """
import json, os
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import numpy as np
import tensorflow as tf
from benchmarks.memory import peak_requested_mib
from keras_metapt import optim
from keras_metapt.hypergrad.sama import optimizer_preconditioned

rng = np.random.default_rng(0)
p, v, m, s = (tf.constant(x.astype(np.float32)) for x in (
    rng.normal(size=(512, 512)), rng.normal(size=(512, 512)),
    0.1 * rng.normal(size=(512, 512)), rng.random((512, 512))))

def inner(params, h):
    return 0.5 * tf.reduce_sum(tf.square(params[0])) * h[0]

peaks = {}
for fuse in (False, True):
    @tf.function  # arguments, not captured constants, which Grappler would fold away
    def fn(p, v, m, s, fuse=fuse):
        return optimizer_preconditioned(inner, [p], [tf.constant(1.0)], [v], optim.adam(0.01),
                                        (tf.constant(3), [m], [s]), fuse_update=fuse)[0]
    fn(p, v, m, s)
    peaks[str(fuse)] = peak_requested_mib(lambda: fn(p, v, m, s).numpy())[0]
print(json.dumps(peaks))
"""


def test_fused_preconditioner_holds_no_temporaries():
    """Adam's update JVP on one 512 x 512 leaf (1 MiB): in plain operations it holds the
    gradient, the vector and about seven leaf-sized temporaries at once; as one XLA function
    (fused elementwise loop) only the gradient, the vector and the result. Reference: the
    plain-operations peak of held tensors (BFC allocator, a fresh process). Required below
    0.5x."""
    proc = subprocess.run([sys.executable, "-c", HELD_FUSED_SCRIPT], capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["True"] < 0.5 * peaks["False"], peaks


def test_a_none_outer_gradient_leaf_is_a_known_zero():
    """-M P g with g's second leaf None: SAMA's formula written out in NumPy with that leaf of
    P g zero (M v = e^h sum a p v), for Adam (elementwise: the leaf is left out; and as a
    non-elementwise optimizer: it enters as zeros), SGD's step size and the identity."""
    params, curvature, inner, m_old, v_old, rng = three_leaf_problem(7)
    h = 0.3
    flat_p = [x.numpy() for x in tf.nest.flatten(params)]
    outer = [rng.normal(size=x.shape) for x in flat_p]
    outer[1] = None
    outer_grad = tf.nest.pack_sequence_as(
        params, [None if x is None else tf.constant(x) for x in outer])
    g_inner = [np.exp(h) * a * x for a, x in zip(curvature, flat_p)]
    zeros = [np.zeros_like(x) if o is None else o for o, x in zip(outer, flat_p)]
    adam, state = adam_and_state(params, m_old, v_old)

    def expected(pg):
        return -np.exp(h) * sum(np.sum(a * x * v) for a, x, v in zip(curvature, flat_p, pg))

    cases = [(dict(optimizer=adam, opt_state=state),
              adam_preconditioned(g_inner, m_old, v_old, zeros)),
             (dict(optimizer=adam._replace(elementwise=False), opt_state=state),
              adam_preconditioned(g_inner, m_old, v_old, zeros)),
             (dict(step_size=0.1), [0.1 * v for v in zeros]),
             ({}, zeros)]
    for kwargs, pg in cases:
        (got,) = first_order_indirect_term(inner, params, [tf.constant(h, tf.float64)],
                                           outer_grad, radius=1e-3, **kwargs)
        assert rel_err(got, expected(pg)) < 1e-8, kwargs
    none = tf.nest.map_structure(lambda _: None, params)  # g = 0: no indirect term
    assert first_order_indirect_term(inner, params, [tf.constant(h, tf.float64)], none,
                                     optimizer=adam, opt_state=state) == [None]


def test_finite_difference_mixed_product_is_second_order_in_eps():
    def loss(p, h):
        return tf.reduce_sum(tf.exp(h[0]) * tf.math.log(tf.cosh(p[0])) * p[0] ** 2)

    rng = np.random.default_rng(5)
    params, hparams = [tf.constant(rng.normal(size=4))], [tf.constant(rng.normal(size=4))]
    v = [tf.constant(rng.normal(size=4))]
    exact = linalg.mixed_vjp(loss, params, hparams, v)[0].numpy()
    errors = [np.abs(finite_difference_mixed_vjp(loss, params, hparams, v, eps)[0].numpy()
                     - exact).max() for eps in (1e-2, 5e-3)]
    assert errors[0] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5  # halving eps divides the error by 4


def test_sama_compiles_with_xla_and_refuses_a_bad_radius():
    ridge = Ridge()
    inner, outer = ridge.batches()
    estimator = km.SAMA(optim.sgd(0.1))
    eager = estimator(ridge.problem(), [np.ones(6)], [ridge.log_lam], inner, outer)
    xla = tf.function(lambda p, h: estimator(ridge.problem(), p, h, inner, outer),
                      jit_compile=True)([tf.ones(6, tf.float64)], [tf.constant(ridge.log_lam)])
    np.testing.assert_allclose(xla.hypergrad[0], eager.hypergrad[0], rtol=1e-9)
    with pytest.raises(ValueError, match="radius"):
        km.SAMA(radius=0.0)
