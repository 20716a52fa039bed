"""HyperDistill, the online estimator by hypergradient distillation.

References, all float64 on a quadratic with per-coordinate weight decay as the
hyperparameters, L_in = w^T H w / 2 - b^T w + sum_i exp(phi_i) w_i^2 / 2, SGD at rate eta:
A = I - eta (H + diag e^phi) and B_s = -eta diag(e^phi * w_{s-1}) in closed form, so
- the online second-order term over the whole past, sum_s gamma^(t-s) alpha^T A^(t-s) B_s, is
  summed directly in NumPy;
- the estimator's every call (distilled point, DrMAD-style reference, least-squares scale) is
  transcribed in NumPy from the module's formulas;
- p_t and c_t are checked against their defining sums;
- the cost is counted in loss evaluations against the one-step estimator's.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from keras_metapt.hypergrad import hyperdistill as hd

P, ETA = 6, 0.1
RNG = np.random.default_rng(7)
_M = RNG.normal(size=(P, P))
H = _M @ _M.T / P + 0.2 * np.eye(P)
BVEC = RNG.normal(size=P)
W_STAR = RNG.normal(size=P)
W0 = 3.0 * RNG.normal(size=P)
PHI = np.log(0.3 + RNG.uniform(size=P))
DECAY = np.exp(PHI)
A_MAT = np.eye(P) - ETA * (H + np.diag(DECAY))


def inner_loss(params, hparams, batch):
    w = params[0]
    h, b = batch
    return (0.5 * tf.tensordot(w, tf.linalg.matvec(h, w), 1) - tf.tensordot(b, w, 1)
            + 0.5 * tf.reduce_sum(tf.exp(hparams[0]) * w ** 2))


def outer_loss(params, hparams, batch):
    return 0.5 * tf.reduce_sum((params[0] - batch) ** 2)


PROBLEM = km.BilevelProblem(inner_loss, outer_loss)
INNER = (tf.constant(H), tf.constant(BVEC))
OUTER = tf.constant(W_STAR)


def trajectory(num_steps, h=H, b=BVEC, decay=DECAY, w0=W0):
    """w_0 .. w_T of SGD on L_in (closed-form gradient)."""
    points = [w0]
    for _ in range(num_steps):
        w = points[-1]
        points.append(w - ETA * (h @ w - b + decay * w))
    return points


def exact_damped_term(points, t, gamma, h=H, decay=DECAY, w_star=W_STAR):
    """sum_{s=1}^t gamma^(t-s) alpha_t^T A^(t-s) B_s with alpha_t = w_t - w*, by the
    recursion a <- gamma A^T a from s = t down to 1."""
    a_mat = np.eye(P) - ETA * (h + np.diag(decay))
    a = points[t] - w_star
    total = np.zeros(P)
    for s in range(t, 0, -1):
        total += a * (-ETA * decay * points[s - 1])
        a = gamma * a_mat.T @ a
    return total


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_point_fraction_and_geometric_sum_equal_their_defining_sums(gamma):
    for t in (1, 2, 3, 10, 200):
        weights = np.array([gamma ** (t - s) for s in range(1, t + 1)])
        c = weights.sum()
        p = 1.0 if t == 1 else float(np.dot(weights, np.arange(t)) / ((t - 1) * c))
        np.testing.assert_allclose(float(hd.geometric_sum(t, gamma)), c, rtol=1e-12)
        np.testing.assert_allclose(float(hd.distilled_point_fraction(t, gamma)), p, rtol=1e-9)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_reference_pass_on_the_true_trajectory_equals_the_direct_sum(gamma):
    t = 12
    points = trajectory(t)
    hparams = [tf.constant(PHI)]
    optimizer = optim.sgd(ETA)

    def step_vjp(w, cotangent):
        with tf.GradientTape() as tape:
            tape.watch(w + hparams)
            stepped, _ = km.hypergrad.problem.inner_step(
                PROBLEM, optimizer, w, optimizer.init(w), hparams, INNER, tf.constant(0), 1)
        return tape.gradient(stepped, (w, hparams), output_gradients=cotangent)

    stacked = tf.constant(np.stack(points[:t]))
    got = hd.damped_second_order_term(step_vjp, lambda k: [tf.gather(stacked, k)], t,
                                      [tf.constant(points[t] - W_STAR)], gamma, hparams)
    np.testing.assert_allclose(got[0].numpy(), exact_damped_term(points, t, gamma),
                               rtol=1e-10, atol=1e-13)


def numpy_hyperdistill(points, gamma, distill_every, reference_steps, initial_scale,
                       anchor_every=None, call_steps=None, median_window=None):
    """The module's formulas, transcribed: the indirect term at every call, at steps
    t = ``call_steps`` (default 1..T; the steps between calls are taken without the
    estimator). A reference at the first call at or after each multiple of distill_every; the
    anchor moves to w_(t-1) at the first call with t - 1 at or after each multiple of
    anchor_every. With ``median_window``: theta is the median of the last median_window
    per-reference fits <v, y> / (c |v|^2)."""
    cross = square = 0.0
    ratios = []
    anchor, anchor_step = W0, 0
    out = []
    previous_t = 0
    for t in call_steps or range(1, len(points)):
        w_prev, w_t = points[t - 1], points[t]
        reference_anchor, reference_anchor_step = anchor, anchor_step  # before any move
        if anchor_every and t > 1 and any(
                (k % anchor_every == 0) for k in range(max(previous_t - 1, 0) + 1, t)):
            anchor, anchor_step = w_prev, t - 1
        m = t - anchor_step
        alpha = w_t - W_STAR
        c = sum(gamma ** (t - s) for s in range(1, t + 1))
        weights = np.array([gamma ** (m - s) for s in range(1, m + 1)])
        p = 1.0 if m == 1 else np.dot(weights, np.arange(m)) / ((m - 1) * weights.sum())
        w_hat = anchor + p * (w_prev - anchor)
        v = alpha * (-ETA * DECAY * w_hat)
        if distill_every and any(k % distill_every == 0 for k in range(previous_t + 1, t + 1)):
            m_ref = t - reference_anchor_step
            n = min(m_ref, reference_steps)
            y, a = np.zeros(P), alpha.copy()
            for s in range(t, t - n, -1):  # point w_{s-1} on the line anchor -> w_t
                point = reference_anchor + (s - 1 - reference_anchor_step) / m_ref * (
                    w_t - reference_anchor)
                y += a * (-ETA * DECAY * point)
                a = gamma * A_MAT.T @ a
            cross += c * np.dot(v, y)
            square += c * c * np.dot(v, v)
            ratios.append(np.dot(v, y) / (c * np.dot(v, v)))
        theta = cross / square if square > 0 else initial_scale
        if median_window:
            theta = float(np.median(ratios[-median_window:])) if ratios else initial_scale
        out.append(theta * c * v)
        previous_t = t
    return out


@pytest.mark.parametrize("mode,anchor_every,every,horizon", [
    ("eager", None, 7, 10), ("function", None, 7, 10),
    # references at t = 6, 12, .. at the end of each anchor's segment (m = 6), truncated to 4
    ("function", 6, 6, 4)])
def test_every_call_equals_a_numpy_transcription(mode, anchor_every, every, horizon):
    steps, gamma = 25, 0.9
    points = trajectory(steps)
    expected = numpy_hyperdistill(points, gamma, distill_every=every, reference_steps=horizon,
                                  initial_scale=0.5, anchor_every=anchor_every)
    estimator = km.HyperDistill(optim.sgd(ETA), gamma, distill_every=every,
                                reference_steps=horizon, initial_scale=0.5,
                                anchor_every=anchor_every).start([W0])
    call = lambda w: estimator(PROBLEM, [w], [tf.constant(PHI)], INNER, OUTER)  # noqa: E731
    if mode == "function":
        call = tf.function(call)
    w = tf.constant(W0)
    for t in range(1, steps + 1):
        result = call(w)
        np.testing.assert_allclose(result.params[0].numpy(), points[t], rtol=1e-12)
        np.testing.assert_allclose(result.indirect[0].numpy(), expected[t - 1], rtol=1e-9,
                                   atol=1e-14)
        w = result.params[0]
    assert int(estimator.state.references.numpy()) == steps // every


@pytest.mark.parametrize("anchor_every", [None, 7])
def test_calls_every_few_steps_with_advance_equal_the_numpy_transcription(anchor_every):
    """The run takes 3 plain steps between calls (counted by advance(3) after each call's own
    step): t = 1, 5, 9, ..; references at the first call at or after each multiple of 6
    (t = 9, 13, 21, 25, ..), truncated to 4 steps; with anchor_every the anchor moves at the
    first call with t - 1 at or after each multiple of 7; at t = 9, 25 and 37 both happen, and
    the reference runs over the segment from the anchor before the move (not over the one
    step since the new anchor, where it would equal the distilled term). Reference: the
    transcription with those call steps, on the true SGD trajectory."""
    steps, gamma, every = 40, 0.9, 6
    call_steps = list(range(1, steps + 1, 4))
    points = trajectory(steps)
    expected = numpy_hyperdistill(points, gamma, distill_every=every, reference_steps=4,
                                  initial_scale=0.5, anchor_every=anchor_every,
                                  call_steps=call_steps)
    estimator = km.HyperDistill(optim.sgd(ETA), gamma, distill_every=every, reference_steps=4,
                                initial_scale=0.5, anchor_every=anchor_every).start([W0])
    call = tf.function(lambda w: estimator(PROBLEM, [w], [tf.constant(PHI)], INNER, OUTER))
    for k, t in enumerate(call_steps):
        result = call(tf.constant(points[t - 1]))
        np.testing.assert_allclose(result.params[0].numpy(), points[t], rtol=1e-12)
        np.testing.assert_allclose(result.indirect[0].numpy(), expected[k], rtol=1e-9,
                                   atol=1e-14)
        estimator.advance(3)
    assert int(estimator.state.step.numpy()) == 4 * len(call_steps)
    assert int(estimator.state.references.numpy()) == len(
        [t for k, t in enumerate(call_steps)
         if (t // every) > ((call_steps[k - 1] if k else 0) // every)])
    if anchor_every:
        both = [t for k, t in enumerate(call_steps[1:], 1)
                if t // every > call_steps[k - 1] // every
                and (t - 1) // anchor_every > (call_steps[k - 1] - 1) // anchor_every]
        assert both == [9, 25, 37]
    with pytest.raises(ValueError, match="num_steps >= 0"):
        estimator.advance(-1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_steps >= 0"):
        estimator.advance(tf.constant(-1))


def test_gamma_zero_is_the_one_step_hypergradient():
    """Reference: Unrolled(sgd, 1), the one-step look-ahead: with gamma = 0, p_t = 1 and
    c_t = 1, so the distilled term is the one-step term exactly (theta fixed at 1)."""
    estimator = km.HyperDistill(optim.sgd(ETA), 0.0, distill_every=0).start([W0])
    points = trajectory(5)
    for t in range(1, 6):
        args = ([tf.constant(points[t - 1])], [tf.constant(PHI)], INNER, OUTER)
        ours = estimator(PROBLEM, *args)
        greedy = km.Unrolled(optim.sgd(ETA), 1)(PROBLEM, *args)
        np.testing.assert_allclose(ours.hypergrad[0].numpy(), greedy.hypergrad[0].numpy(),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_with_the_full_horizon_term_beats_the_one_step_hypergradient(seed):
    """A slow, ill-conditioned run (curvature 0.003 .. 0.3 at rate 0.1, 150 steps, phi fixed):
    the undamped online term over the whole past is the regime of short-horizon bias.
    HyperDistill's second-order term (gamma 0.99) is closer in direction to it than the
    one-step term: its mean misalignment 1 - cosine is under half the one-step term's
    (cosine is blind to the scale, so this checks the distilled point)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(P, P)))
    h = q @ np.diag(np.geomspace(0.003, 0.3, P)) @ q.T
    b, w_star, w0 = rng.normal(size=P), rng.normal(size=P), 3.0 * rng.normal(size=P)
    phi = np.log(0.0009 * (1.0 + rng.uniform(size=P)))
    steps = 150
    points = trajectory(steps, h, b, np.exp(phi), w0)
    inner, outer, hparams = (tf.constant(h), tf.constant(b)), tf.constant(w_star), [tf.constant(phi)]
    distill = km.HyperDistill(optim.sgd(ETA), 0.99, distill_every=0).start([w0])
    one_step = km.Unrolled(optim.sgd(ETA), 1)
    cosines = []
    for t in range(1, steps + 1):
        w_prev = [tf.constant(points[t - 1])]
        exact = exact_damped_term(points, t, 1.0, h, np.exp(phi), w_star)
        ours = distill(PROBLEM, w_prev, hparams, inner, outer).indirect[0].numpy()
        greedy = one_step(PROBLEM, w_prev, hparams, inner, outer).indirect[0].numpy()
        cosines.append((cosine(ours, exact), cosine(greedy, exact)))
    ours_mean, greedy_mean = np.mean(cosines[1:], axis=0)  # t = 1: both are exact
    np.testing.assert_allclose(*cosines[0], rtol=1e-12)
    assert 1.0 - ours_mean < 0.5 * (1.0 - greedy_mean), (ours_mean, greedy_mean)


def counting(fn, counter, key):
    def wrapped(*args):
        counter[key] += 1
        return fn(*args)
    return wrapped


def test_cost_is_one_step_vjp_on_top_of_the_one_step_terms():
    """Eager loss evaluations per call: the one-step estimator evaluates the inner loss once
    (its step, differentiated twice by the tape) and the outer loss once; HyperDistill adds
    exactly one inner-loss evaluation, the step at the distilled point that its one
    vector-Jacobian product differentiates; a reference adds one per reference step."""
    counts = {"inner": 0, "outer": 0}
    problem = km.BilevelProblem(counting(inner_loss, counts, "inner"),
                                counting(outer_loss, counts, "outer"))
    args = ([tf.constant(W0)], [tf.constant(PHI)], INNER, OUTER)
    km.Unrolled(optim.sgd(ETA), 1)(problem, *args)
    assert counts == {"inner": 1, "outer": 1}
    estimator = km.HyperDistill(optim.sgd(ETA), 0.9, distill_every=3, reference_steps=2)
    estimator.start([W0])
    for call, expected_inner in ((1, 2), (2, 2), (3, 2 + 2)):
        counts.update(inner=0, outer=0)
        estimator(problem, *args)
        assert counts == {"inner": expected_inner, "outer": 1}, call


def test_state_checkpoints_and_a_start_is_required(tmp_path):
    with pytest.raises(ValueError, match="start"):
        km.HyperDistill(optim.sgd(ETA))(PROBLEM, [tf.constant(W0)], [tf.constant(PHI)], INNER,
                                        OUTER)
    first = km.HyperDistill(optim.sgd(ETA), 0.9, distill_every=2).start([W0])
    w = [tf.constant(W0)]
    for _ in range(3):
        w = first(PROBLEM, w, [tf.constant(PHI)], INNER, OUTER).params
    path = tf.train.Checkpoint(**first.checkpoint_items()).write(str(tmp_path / "ckpt"))
    second = km.HyperDistill(optim.sgd(ETA), 0.9, distill_every=2).start([np.zeros(P)])
    tf.train.Checkpoint(**second.checkpoint_items()).read(path).assert_consumed()
    a = first(PROBLEM, w, [tf.constant(PHI)], INNER, OUTER).hypergrad[0].numpy()
    b = second(PROBLEM, w, [tf.constant(PHI)], INNER, OUTER).hypergrad[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert float(first.scale) == float(second.scale) != 1.0
    with pytest.raises(ValueError, match="shapes"):
        second.start([np.zeros(P + 1)])
    with pytest.raises(ValueError, match="gamma"):
        km.HyperDistill(optim.sgd(ETA), 0.99999)
    with pytest.raises(ValueError, match="scale_fit"):
        km.HyperDistill(optim.sgd(ETA), scale_fit="mean")


def test_distilled_term_alone_and_without_updating_the_state():
    """Reference: the transcription's indirect term at t = 5 after 4 advanced steps (no
    reference due), cotangent alpha = w_5 - w* given by the caller; update_state=False gives
    the same term and leaves step, anchor and fit as they were."""
    points = trajectory(5)
    expected = numpy_hyperdistill(points, 0.9, distill_every=0, reference_steps=1,
                                  initial_scale=0.5, call_steps=[5])[0]
    estimator = km.HyperDistill(optim.sgd(ETA), 0.9, distill_every=0, initial_scale=0.5)
    estimator.start([W0]).advance(4)
    args = (PROBLEM, [tf.constant(points[4])], [tf.constant(PHI)], INNER,
            [tf.constant(points[5] - W_STAR)])
    read_only = estimator.distilled_term(*args, update_state=False)
    assert int(estimator.state.step.numpy()) == 4
    counted = estimator.distilled_term(*args)
    assert int(estimator.state.step.numpy()) == 5
    for got in (read_only, counted):
        np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("window", [3, 4])
def test_median_scale_fit_equals_its_transcription(window):
    """Reference: the transcription with theta the median of the last `window` per-reference
    fits <v, y> / (c |v|^2) (odd and even windows; the window fills, then slides over 8
    references); initial_scale before the first."""
    steps, gamma, every = 24, 0.9, 3
    points = trajectory(steps)
    expected = numpy_hyperdistill(points, gamma, distill_every=every, reference_steps=4,
                                  initial_scale=0.5, median_window=window)
    estimator = km.HyperDistill(optim.sgd(ETA), gamma, distill_every=every, reference_steps=4,
                                initial_scale=0.5, scale_fit="median",
                                median_window=window).start([W0])
    call = tf.function(lambda w: estimator(PROBLEM, [w], [tf.constant(PHI)], INNER, OUTER))
    assert float(estimator.scale) == 0.5
    for t in range(1, steps + 1):
        result = call(tf.constant(points[t - 1]))
        np.testing.assert_allclose(result.indirect[0].numpy(), expected[t - 1], rtol=1e-9,
                                   atol=1e-14)
    assert int(estimator.state.ratio_count.numpy()) == steps // every


def test_reference_loop_stays_functional_inside_a_compiled_cond():
    """The reference pass traced in a tf.function, inside a tf.cond as HyperDistill calls it:
    its While op is kept functional (`_lower_using_switch_merge` False; a lowered loop let
    Grappler's AddN rewrite leave a temporary variable behind, which failed the next call, see
    tests/apps/test_simclr_augment.py), and two calls equal the recursion y = sum_k
    gamma^(n-1-k) a_k^T B, a_(k-1) = gamma A^T a_k for the linear step w -> A w + phi,
    written in NumPy."""
    a_mat = tf.constant(A_MAT)
    cotangent = tf.constant(W_STAR)
    phi = tf.constant(PHI)

    def step_vjp(w, a):
        with tf.GradientTape() as tape:
            tape.watch([w, phi])
            stepped = tf.linalg.matvec(a_mat, w) + phi
        return tape.gradient(stepped, (w, phi), output_gradients=a)

    @tf.function
    def reference(n):
        return tf.cond(n > 0, lambda: hd.damped_second_order_term(
            step_vjp, lambda k: tf.constant(W0), n, cotangent, 0.9, phi),
            lambda: tf.zeros_like(phi))

    graph = reference.get_concrete_function(tf.TensorSpec([], tf.int32)).graph
    loops = [op for f in graph._functions.values() for op in f.graph.get_operations()
             if op.type in ("While", "StatelessWhile")]
    assert loops and all(not op.get_attr("_lower_using_switch_merge") for op in loops)
    a, expected = W_STAR.copy(), np.zeros(P)
    for _ in range(4):
        expected += a
        a = 0.9 * A_MAT.T @ a
    for _ in range(2):
        np.testing.assert_allclose(reference(tf.constant(4)).numpy(), expected, rtol=1e-12)
