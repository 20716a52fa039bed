"""WarpGrad against an independent NumPy transcription of its update rules (Flennerhag et al.
2020: the authors' `warp_on_same_loss` and `simplified_leap`, with the differences listed in
the module's docstring), on a warped linear regression in float64: prediction (x A) . w
with task weights w (adapted) and a warp matrix A.

Reference, per meta-step: the T-step SGD trajectories on w (closed-form gradients), the
buffered points (evenly spaced steps), the warp objective's gradient
dJ/dA of J(A) = L(w_s - alpha grad_w L(w_s, A; b_s), A; b'_s) by central finite differences,
SGD on A chunk by chunk in the learner's shuffle order (the order only: it is a random
permutation, taken from `point_order`), and the Leap step on the initialisation; with
``init_update="first_order_maml"``, plain SGD on the initialisation along the task-weighted
closed-form query gradient at each task's theta_T, under the A the tasks adapted with.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hypergrad import StepBatches
from keras_metapt.taskmeta import (WarpGrad, classification_loss, conv_classifier_logits,
                                   conv_classifier_params, identity_warp_params,
                                   warped_classification_loss, warped_classifier_logits)
from keras_metapt.taskmeta.warpgrad import buffered_steps

D, ALPHA, WARP_LR, INIT_LR, FOMAML_LR = 3, 0.1, 0.05, 0.02, 0.3


def warped_loss(theta, omega, batch):
    x, y = batch
    return 0.5 * tf.reduce_mean(tf.square(tf.linalg.matvec(x @ omega[0], theta[0]) - y))


def np_loss(w, a, batch):
    x, y = batch
    return 0.5 * np.mean((x @ a @ w - y) ** 2)


def np_grad_w(w, a, batch):
    x, y = batch
    z = x @ a
    return z.T @ (z @ w - y) / len(y)


def np_objective(w, a, first, second):
    return np_loss(w - ALPHA * np_grad_w(w, a, first), a, second)


def np_grad_a(w, a, first, second, eps=1e-6):
    grad = np.zeros_like(a)
    for idx in np.ndindex(*a.shape):
        up, down = a.copy(), a.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (np_objective(w, up, first, second)
                     - np_objective(w, down, first, second)) / (2 * eps)
    return grad


def reference_meta_step(phi, a, task_batches, queries, weights, steps, points, chunk, order,
                        init_update="leap"):
    """One WarpGrad meta-step in NumPy; task_batches[m][t] is task m's batch at step t."""
    weights = np.asarray(weights, float) / np.sum(weights)
    m_tasks = len(task_batches)
    buffer, leap_total, query_grad = [], np.zeros_like(phi), np.zeros_like(phi)
    for m in range(m_tasks):
        w, leap = phi.copy(), np.zeros_like(phi)
        for t in range(steps):
            if t in points:
                second = queries[m] if queries is not None else task_batches[m][(t + 1) % steps]
                buffer.append((w.copy(), task_batches[m][t], second, m_tasks * weights[m]))
            move = -ALPHA * np_grad_w(w, a, task_batches[m][t])
            leap += move / (np.linalg.norm(move) + 1e-9)
            w = w + move
        leap_total += weights[m] * leap
        if init_update == "first_order_maml":
            query_grad += weights[m] * np_grad_w(w, a, queries[m])
    a = a.copy()
    n = len(buffer)
    for start in range(0, n, chunk):
        picked = [buffer[k] for k in order[start:start + chunk]]
        grad = sum(scale * np_grad_a(w, a, first, second)
                   for w, first, second, scale in picked) / len(picked)
        a = a - WARP_LR * grad
    if init_update == "first_order_maml":
        return phi - FOMAML_LR * query_grad, a
    return phi + INIT_LR * leap_total, a


def regression_batch(rng, n):
    return rng.normal(size=(n, D)), rng.normal(size=n)


@pytest.mark.parametrize("steps, num_points, warp_batch, per_step, with_query, init_update", [
    (4, None, 1, False, True, "leap"),    # every point, one warp step per point, query sets
    (4, 2, 3, True, False, "leap"),       # points 0 and 3, chunks of 3 and 1, minibatch per step
    (4, 2, 1, True, True, "first_order_maml"),  # phi by the first-order MAML meta-gradient
])
def test_meta_steps_match_a_numpy_transcription(steps, num_points, warp_batch, per_step,
                                                with_query, init_update):
    rng = np.random.default_rng(7)
    phi = rng.normal(size=D)
    a = np.eye(D) + 0.1 * rng.normal(size=(D, D))
    fomaml = init_update == "first_order_maml"
    learner = WarpGrad(warped_loss, [phi], [a], inner_steps=steps, inner_learning_rate=ALPHA,
                       warp_learning_rate=WARP_LR, init_learning_rate=INIT_LR,
                       trajectory_points=num_points, warp_batch=warp_batch, seed=3,
                       init_update=init_update,
                       meta_optimizer=keras.optimizers.SGD(FOMAML_LR) if fomaml else None)
    points = buffered_steps(steps, num_points)
    assert points == ([0, 3] if num_points == 2 else [0, 1, 2, 3])
    weights = [1.0, 3.0]
    for _ in range(2):  # two meta-steps: the second starts from the first's phi and A
        if per_step:
            per_task = [[regression_batch(rng, 5) for _ in range(steps)] for _ in range(2)]
            support = StepBatches(tuple(np.stack([[b[i] for b in task] for task in per_task])
                                        for i in range(2)))
        else:
            shared = [regression_batch(rng, 5) for _ in range(2)]
            per_task = [[b] * steps for b in shared]
            support = tuple(np.stack([b[i] for b in shared]) for i in range(2))
        queries = [regression_batch(rng, 6) for _ in range(2)] if with_query else None
        query = (tuple(np.stack([q[i] for q in queries]) for i in range(2))
                 if with_query else None)
        order = learner.point_order(2 * len(points)).numpy()
        want_phi, want_a = reference_meta_step(phi, a, per_task, queries, weights, steps,
                                               points, warp_batch, order, init_update)
        metrics = learner.meta_step(support, query, task_weights=weights)
        # the reference A carries finite-difference error (~1e-10), into phi at the second step
        np.testing.assert_allclose(learner.initialisation[0].numpy(), want_phi, rtol=1e-7,
                                   atol=1e-8)
        np.testing.assert_allclose(learner.warp[0].numpy(), want_a, rtol=1e-6, atol=1e-9)
        assert np.isfinite(metrics["warp_objective"]) and metrics["distance"] > 0
        phi, a = want_phi, want_a


def test_adaptation_moves_only_the_task_weights_through_the_current_warp():
    """Reference: T SGD steps on w with the warp matrix held at its value (NumPy)."""
    rng = np.random.default_rng(1)
    phi, a = rng.normal(size=D), np.eye(D) + 0.2 * rng.normal(size=(D, D))
    learner = WarpGrad(warped_loss, [phi], [a], inner_steps=3, inner_learning_rate=ALPHA)
    batch = regression_batch(rng, 8)
    w = phi.copy()
    for _ in range(3):
        w = w - ALPHA * np_grad_w(w, a, batch)
    np.testing.assert_allclose(learner.adapt(batch)[0].numpy(), w, rtol=1e-10)
    np.testing.assert_array_equal(learner.warp[0].numpy(), a)


def test_identity_warps_compute_the_plain_classifier():
    """Reference: `conv_classifier_logits` and `classification_loss` with the same params."""
    params = conv_classifier_params(3, (8, 8, 1), width=4, blocks=2, seed=2)
    params[-2] = np.random.default_rng(0).normal(size=params[-2].shape).astype(np.float32)
    images = tf.random.stateless_normal((6, 8, 8, 1), [1, 2])
    warps = identity_warp_params(width=4, blocks=2)
    np.testing.assert_allclose(warped_classifier_logits(params, warps, images),
                               conv_classifier_logits(params, images), rtol=1e-5, atol=1e-6)
    labels = tf.constant([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(warped_classification_loss(params, warps, (images, labels)),
                               classification_loss(params, (images, labels)), rtol=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="warp_batch"):
        WarpGrad(warped_loss, [np.zeros(D)], [np.eye(D)], warp_batch=0)
    with pytest.raises(ValueError, match="warp_learning_rate"):
        WarpGrad(warped_loss, [np.zeros(D)], [np.eye(D)], warp_learning_rate=-1)
    with pytest.raises(ValueError, match="num_points"):
        buffered_steps(5, 0)
    with pytest.raises(ValueError, match="init_update"):
        WarpGrad(warped_loss, [np.zeros(D)], [np.eye(D)], init_update="reptile")
    with pytest.raises(ValueError, match="meta_optimizer"):
        WarpGrad(warped_loss, [np.zeros(D)], [np.eye(D)], meta_optimizer=keras.optimizers.SGD())
    learner = WarpGrad(warped_loss, [np.zeros(D)], [np.eye(D)], inner_steps=2,
                       init_update="first_order_maml")
    support = (np.zeros((1, 4, D)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="needs query sets"):
        learner.meta_step(support)
