"""PT/FT hypergradients (Raghu et al. 2021).

References:
* an independent float64 computation in this file: explicit Hessian and mixed-derivative
  matrices of L_PT (GradientTape.jacobian over flattened parameters), an FT unroll written
  out step by step, and the Neumann sum alpha sum_j (I - alpha H)^j g evaluated with NumPy;
* for a convex case (linear encoder, quadratic losses), central finite differences of the
  FT validation loss after solving PT exactly (normal equations in NumPy) and K FT steps;
* for the online PT stage (HyperDistill), the same explicit Hessians and mixed derivatives
  taken at every point of its line, and the one-step term.
"""

import dataclasses
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from tests.conftest import compiled, rel_err

# --------------------------------------------------------------------------- tiny nonlinear model

RNG = np.random.default_rng(0)
X_PT = RNG.normal(size=(12, 2))
Y_PT = (RNG.random(size=(12, 2)) < 0.5).astype(np.float64)
X_MT, Y_MT = RNG.normal(size=(10, 2)), RNG.normal(size=(10, 1))
X_MV, Y_MV = RNG.normal(size=(8, 2)), RNG.normal(size=(8, 1))
THETA_E = [RNG.normal(size=(2, 3)), RNG.normal(size=3) * 0.1]
THETA_H = [RNG.normal(size=(3, 2)), RNG.normal(size=2) * 0.1]
PSI = [RNG.normal(size=(3, 1)), np.zeros(1)]
PHI = RNG.normal(size=2) * 0.5
FT_LR = 0.3


def features(e, x):
    return tf.tanh(tf.matmul(x, e[0]) + e[1])


def pt_loss(e, h, phi, batch):
    x, y = batch
    logits = tf.matmul(features(e, x), h[0]) + h[1]
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
    return tf.reduce_sum(2.0 * tf.sigmoid(phi[0]) * tf.reduce_mean(bce, axis=0))


def ft_loss(e, psi, batch):
    x, y = batch
    pred = tf.matmul(features(e, x), psi[0]) + psi[1]
    return 0.5 * tf.reduce_mean((pred - y) ** 2)


PROBLEM = km.PretrainFinetuneProblem(pt_loss, ft_loss)


def flat(parts):
    return tf.concat([tf.reshape(p, [-1]) for p in parts], 0)


def unflat(vec, like):
    out, i = [], 0
    for p in like:
        n = int(np.prod(p.shape))
        out.append(tf.reshape(vec[i:i + n], p.shape))
        i += n
    return out


def ft_gradient(K):
    """g_FT = d L_FT(theta_E, psi_K; MetaVal) / d theta_E after K FT steps written out
    (flattened), and the MetaVal loss."""
    e_vec = tf.constant(flat(THETA_E))
    with tf.GradientTape() as tape:
        tape.watch(e_vec)
        e = unflat(e_vec, THETA_E)
        psi = [tf.constant(p) for p in PSI]
        for _ in range(K):  # the FT unroll, written out
            with tf.GradientTape() as inner:
                inner.watch(psi)
                loss = ft_loss(e, psi, (X_MT, Y_MT))
            psi = [p - FT_LR * g for p, g in zip(psi, inner.gradient(loss, psi))]
        val = ft_loss(e, psi, (X_MV, Y_MV))
    return tape.gradient(val, e_vec).numpy(), float(val)


def explicit_pt_derivatives(point_vec):
    """H = d2 L_PT / d theta_P2 and M = d (grad L_PT) / d phi at a flattened point (float64,
    GradientTape.jacobian), phi = PHI, on the PT batch."""
    p_vec, phi = tf.constant(point_vec), tf.constant(PHI)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([p_vec, phi])
        with tf.GradientTape() as inner:
            inner.watch(p_vec)
            parts = unflat(p_vec, THETA_E + THETA_H)
            loss = pt_loss(parts[:2], parts[2:], [phi], (X_PT, Y_PT))
        grad = inner.gradient(loss, p_vec)
    return outer.jacobian(grad, p_vec).numpy(), outer.jacobian(grad, phi).numpy()


def independent_hypergradient(K, num_terms, alpha):
    g_e, val = ft_gradient(K)
    hessian, mixed = explicit_pt_derivatives(flat(THETA_E + THETA_H).numpy())
    rhs = np.concatenate([g_e, np.zeros(hessian.shape[0] - g_e.size)])
    term, total = rhs.copy(), rhs.copy()
    for _ in range(num_terms):
        term = term - alpha * hessian @ term
        total += term
    v = alpha * total
    return -mixed.T @ v, val


@pytest.mark.parametrize("K,num_terms", [(1, 1), (2, 3)])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_matches_independent_explicit_hessian_computation(K, num_terms, mode):
    alpha = 0.05
    estimator = km.PTFT(optim.sgd(FT_LR), unroll_steps=K, solve=km.linalg.neumann(num_terms, alpha))
    result = compiled(lambda params, phi: estimator(PROBLEM, params, phi, (X_PT, Y_PT),
                                                    ((X_MT, Y_MT), (X_MV, Y_MV))), mode)(
        (THETA_E, THETA_H, PSI), [PHI])
    expected, val = independent_hypergradient(K, num_terms, alpha)
    assert rel_err(result.hypergrad[0], expected) < 1e-5
    assert float(result.outer_loss) == pytest.approx(val, rel=1e-10)
    np.testing.assert_array_equal(result.direct[0], 0.0)  # no direct term


def test_meta_train_step_batches_are_used_in_order():
    # Reference: the same unroll with K distinct MetaTrain batches written out by hand.
    batches = (np.stack([X_MT, X_MT[::-1]]), np.stack([Y_MT, -Y_MT]))
    result = km.PTFT(optim.sgd(FT_LR), unroll_steps=2, solve=km.linalg.neumann(1, 1e-3))(
        PROBLEM, (THETA_E, THETA_H, PSI), [PHI], (X_PT, Y_PT),
        (km.StepBatches(batches), (X_MV, Y_MV)))
    psi = [tf.constant(p) for p in PSI]
    for k in range(2):
        with tf.GradientTape() as tape:
            tape.watch(psi)
            loss = ft_loss(THETA_E, psi, (batches[0][k], batches[1][k]))
        psi = [p - FT_LR * g for p, g in zip(psi, tape.gradient(loss, psi))]
    for got, ref in zip(result.params[2], psi):
        np.testing.assert_allclose(got, ref, rtol=1e-12)


# --------------------------------------------------------------------------- convex case

D_X, D_F, N_T, MU = 4, 3, 5, 0.3
C = np.random.default_rng(1)
A_TASKS = C.normal(size=(N_T, D_F))  # fixed per-task read-out of the features
XP, YP = C.normal(size=(30, D_X)), C.normal(size=(30, N_T))
XT, YT = C.normal(size=(20, D_X)), C.normal(size=(20, 1))
XV, YV = C.normal(size=(15, D_X)), C.normal(size=(15, 1))
PHI_C = C.normal(size=N_T) * 0.5
PSI_C = [C.normal(size=(D_F, 1)) * 0.3, np.zeros(1)]
K_FT, LR_FT = 3, 0.2


def convex_pt_loss(e, h, phi, batch):
    """mean_n sum_t w_t (a_t . W x_n + b_t - y_tn)^2 / 2 + mu/2 (||W||^2 + ||b||^2)."""
    x, y = batch
    pred = tf.matmul(tf.matmul(x, e[0]), tf.constant(A_TASKS.T)) + h[0]
    w = 2.0 * tf.sigmoid(phi[0])
    fit = tf.reduce_mean(tf.reduce_sum(w * (pred - y) ** 2, axis=1)) / 2
    return fit + MU / 2 * (tf.reduce_sum(e[0] ** 2) + tf.reduce_sum(h[0] ** 2))


def convex_ft_loss(e, psi, batch):
    x, y = batch
    return 0.5 * tf.reduce_mean((tf.matmul(tf.matmul(x, e[0]), psi[0]) + psi[1] - y) ** 2)


def solve_pt_exactly(phi):
    """Normal equations for z = [vec(W) row-major (D_X x D_F), b]; W maps x to features."""
    w = 2.0 / (1.0 + np.exp(-phi))
    n = len(XP)
    dim = D_X * D_F + N_T
    q, r = MU * np.eye(dim), np.zeros(dim)
    for i in range(n):
        for t in range(N_T):
            row = np.concatenate([np.outer(XP[i], A_TASKS[t]).ravel(), np.eye(N_T)[t]])
            q += w[t] * np.outer(row, row) / n
            r += w[t] * YP[i, t] * row / n
    z = np.linalg.solve(q, r)
    return z[:D_X * D_F].reshape(D_X, D_F), z[D_X * D_F:], q


def ft_val_after_exact_pt(phi):
    w_enc, _, _ = solve_pt_exactly(phi)
    u, c = PSI_C[0].copy(), PSI_C[1].copy()
    ft, fv = XT @ w_enc, XV @ w_enc
    for _ in range(K_FT):
        err = ft @ u + c - YT
        u, c = u - LR_FT * ft.T @ err / len(XT), c - LR_FT * err.mean(0)
    return 0.5 * np.mean((fv @ u + c - YV) ** 2)


def finite_difference_hypergradient(h=1e-5):
    return np.array([(ft_val_after_exact_pt(PHI_C + h * e) - ft_val_after_exact_pt(PHI_C - h * e))
                     / (2 * h) for e in np.eye(N_T)])


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_convex_case_matches_finite_differences(solver):
    w_enc, b, q = solve_pt_exactly(PHI_C)
    alpha = 1.0 / np.linalg.eigvalsh(q).max()
    estimator = km.PTFT(optim.sgd(LR_FT), unroll_steps=K_FT,
                        solve={"cg": km.linalg.cg(200, 1e-14),
                               "neumann": km.linalg.neumann(3000, alpha)}[solver])
    problem = km.PretrainFinetuneProblem(convex_pt_loss, convex_ft_loss)
    result = compiled(lambda params, phi: estimator(problem, params, phi, (XP, YP),
                                                    ((XT, YT), (XV, YV))), "xla")(
        ([w_enc], [b], PSI_C), [PHI_C])
    assert rel_err(result.hypergrad[0], finite_difference_hypergradient()) < 1e-6


def test_bad_inputs_are_named():
    estimator = km.PTFT(optim.sgd(FT_LR), unroll_steps=3, solve=km.linalg.neumann(1, 1e-3))
    batches = (np.stack([X_MT, X_MT]), np.stack([Y_MT, Y_MT]))
    with pytest.raises(km.InputMismatchError, match="2 batches for unroll_steps=3"):
        estimator(PROBLEM, (THETA_E, THETA_H, PSI), [PHI], (X_PT, Y_PT),
                  (km.StepBatches(batches), (X_MV, Y_MV)))
    with pytest.raises(km.UnconnectedHyperparameterError, match=r"hparams\[1\]"):
        estimator(PROBLEM, (THETA_E, THETA_H, PSI), [PHI, np.float64(1.0)], (X_PT, Y_PT),
                  ((X_MT, Y_MT), (X_MV, Y_MV)))


# --------------------------------------------------------------------------- loss scaling

@pytest.mark.parametrize("solver", ["neumann", "cg", "first_order"])
def test_outer_loss_scale_leaves_the_hypergradient_unchanged(solver):
    """Reference: the explicit float64 computation above (Neumann); for CG and the first-order
    hyperstep, the unscaled call (the scale must pass through them linearly)."""
    solve = {"neumann": km.linalg.neumann(3, 0.05), "cg": km.linalg.cg(4),
             "first_order": km.hypergrad.first_order(1e-2).with_optimizer(optim.sgd(0.05), ())
             }[solver]
    estimator = km.PTFT(optim.sgd(FT_LR), unroll_steps=2, solve=solve)

    def run(scale):
        problem = km.PretrainFinetuneProblem(pt_loss, ft_loss, outer_loss_scale=scale)
        return estimator(problem, (THETA_E, THETA_H, PSI), [PHI], (X_PT, Y_PT),
                         ((X_MT, Y_MT), (X_MV, Y_MV)))

    plain, scaled = run(None), run(2.0 ** 20)
    np.testing.assert_allclose(scaled.hypergrad[0], plain.hypergrad[0], rtol=1e-12)
    assert float(scaled.outer_loss) == float(plain.outer_loss)  # reported unscaled
    if solver == "neumann":
        expected, _ = independent_hypergradient(2, 3, 0.05)
        assert rel_err(scaled.hypergrad[0], expected) < 1e-10


# --------------------------------------------------------------------------- online PT stage

def online_call(estimator, params, problem=PROBLEM):
    return estimator(problem, params, [PHI], (X_PT, Y_PT), ((X_MT, Y_MT), (X_MV, Y_MV)))


def test_online_pt_stage_at_gamma_zero_is_the_one_step_term():
    """Reference: the explicit float64 computation above with no Neumann term beyond the
    first, -M^T alpha [g_FT; 0]: with gamma 0 (p_t = 1, c_t = 1) and no references,
    HyperDistill's PT stage is the one-step term at theta_P."""
    alpha = 0.05
    online = km.HyperDistill(optim.sgd(alpha), 0.0, distill_every=0).start((THETA_E, THETA_H))
    estimator = km.PTFT(optim.sgd(FT_LR), unroll_steps=2, online=online)
    result = online_call(estimator, (THETA_E, THETA_H, PSI))
    expected, val = independent_hypergradient(2, 0, alpha)
    assert rel_err(result.hypergrad[0], expected) < 1e-10
    assert float(result.outer_loss) == pytest.approx(val, rel=1e-12)
    assert int(online.state.step.numpy()) == 1


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_online_pt_stage_equals_its_transcription_with_a_reference(mode):
    """HyperDistill as the PT stage after 4 advanced PT steps (t = 5, a reference due at 5,
    truncated to 3 steps): transcribed with explicit Hessians and mixed derivatives at every
    point of the line from the run's start theta_0 to theta_P. With Phi = theta - alpha grad
    L_PT: B(w)^T a = -alpha M(w)^T a and A(w)^T a = a - alpha H(w) a;
    v = B(theta_hat)^T [g_FT; 0], theta_hat = theta_0 + p_5 (theta_P - theta_0);
    y = sum_k gamma^(2-k) a_k^T B(point_k) backward over the points at (s - 1) / 5, s = 3..5;
    the result is theta c_5 v with theta = <v, y> / (c_5 |v|^2)."""
    alpha, gamma, t = 0.05, 0.8, 5
    rng = np.random.default_rng(11)  # the run's start theta_0, away from theta_P
    start = [p + 0.3 * rng.normal(size=np.shape(p)) for p in THETA_E + THETA_H]
    online = km.HyperDistill(optim.sgd(alpha), gamma, distill_every=5, reference_steps=3)
    online.start((start[:2], start[2:]))
    online.advance(t - 1)
    estimator = km.PTFT(optim.sgd(FT_LR), unroll_steps=2, online=online)
    result = compiled(lambda params: online_call(estimator, params), mode)(
        (THETA_E, THETA_H, PSI))
    # reference
    theta_p, theta_0 = flat(THETA_E + THETA_H).numpy(), flat(start).numpy()
    g_ft, _ = ft_gradient(2)
    a0 = np.concatenate([g_ft, np.zeros(theta_p.size - g_ft.size)])
    weights = np.array([gamma ** (t - s) for s in range(1, t + 1)])
    c, p = weights.sum(), np.dot(weights, np.arange(t)) / ((t - 1) * weights.sum())
    _, m_hat = explicit_pt_derivatives(theta_0 + p * (theta_p - theta_0))
    v = -alpha * m_hat.T @ a0
    y, a = np.zeros_like(v), a0.copy()
    for s in range(t, t - 3, -1):
        h, m = explicit_pt_derivatives(theta_0 + (s - 1) / t * (theta_p - theta_0))
        y += -alpha * m.T @ a
        a = gamma * (a - alpha * h @ a)
    expected = (np.dot(v, y) / np.dot(v, v)) * v
    assert rel_err(result.hypergrad[0], expected) < 1e-9
    assert int(online.state.references.numpy()) == 1 and int(online.state.step.numpy()) == t


def test_online_pt_stage_refuses_several_replicas_and_other_objects():
    with pytest.raises(TypeError, match="HyperDistill"):
        km.PTFT(optim.sgd(FT_LR), online=km.linalg.neumann(1))
    online = km.HyperDistill(optim.sgd(0.1)).start((THETA_E, THETA_H))
    with pytest.raises(ValueError, match="one replica"):
        km.PTFT(optim.sgd(FT_LR), online=online,
                gradient_reduction=km.distribute.replica_sum)
    # its fitted theta mixes calls, so a loss-scaled problem is refused, as HyperDistill does
    with pytest.raises(ValueError, match="outer_loss_scale"):
        online_call(km.PTFT(optim.sgd(FT_LR), online=online),
                    (THETA_E, THETA_H, PSI), dataclasses.replace(PROBLEM, outer_loss_scale=4.0))
