"""Continual Trajectory Shifting (keras_metapt.taskmeta.ContinualTrajectoryShifting).

References (float64): a NumPy transcription of the authors' training step (an SGD step per
task on its minibatch, then phi <- phi - beta (phi - mean theta) and every task's theta shifted
by the change of phi), on least-squares tasks; the shift's exactness on linear losses
L_t(theta) = g_t . theta, where a trajectory restarted from the new initialisation is the
old one moved by the change (theta_T - phi_T = -alpha sum_t g_t exactly), and its first-order
error on quadratics, where it is not.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hypergrad import StepBatches
from keras_metapt.taskmeta import ContinualTrajectoryShifting, Reptile

STEPS = 6


def least_squares(params, batch):
    x, y = batch
    return 0.5 * tf.reduce_mean(tf.square(tf.linalg.matvec(x, params["w"]) + params["b"] - y))


def data(seed, tasks=3, features=3, batch=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tasks, STEPS, batch, features))
    w = rng.standard_normal(features) + 0.5 * rng.standard_normal((tasks, features))
    y = np.einsum("mtbf,mf->mtb", x, w) + 0.1 * rng.standard_normal((tasks, STEPS, batch))
    return x, y, rng.standard_normal(features), float(rng.standard_normal())


def params_of(w, b):
    return {"w": tf.constant(w), "b": tf.constant(b, tf.float64)}


def authors_cts(w, b, x, y, weights, alpha, beta, every):
    """The authors' train_step per global step, transcribed (SGD inner optimiser)."""
    phi = [w.copy(), np.array(b)]
    thetas = [[w.copy(), np.array(b)] for _ in range(len(x))]
    for t in range(STEPS):
        for m, theta in enumerate(thetas):
            r = x[m, t] @ theta[0] + theta[1] - y[m, t]
            theta[0] = theta[0] - alpha * x[m, t].T @ r / len(r)
            theta[1] = theta[1] - alpha * r.mean()
        if (t + 1) % every == 0:
            old = [p.copy() for p in phi]
            phi = [p - beta * (p - sum(wm * th[j] for wm, th in zip(weights, thetas)))
                   for j, p in enumerate(phi)]
            for theta in thetas:
                for j in range(2):
                    theta[j] = theta[j] + (phi[j] - old[j])
    return phi, thetas


@pytest.mark.parametrize("every", [1, 2])
def test_a_meta_step_matches_the_authors_step_by_step_update(every):
    x, y, w, b = data(0)
    weights = np.array([1.0, 3.0, 2.0])
    learner = ContinualTrajectoryShifting(least_squares, params_of(w, b), inner_steps=STEPS,
                                          inner_learning_rate=0.1, meta_step_size=0.3,
                                          update_every=every)
    metrics = learner.meta_step(StepBatches((tf.constant(x), tf.constant(y))),
                                task_weights=weights)
    share = weights / weights.sum()
    phi, thetas = authors_cts(w, b, x, y, share, 0.1, 0.3, every)
    got = learner.initial_values()
    np.testing.assert_allclose(got["w"], phi[0], rtol=1e-12)
    assert float(got["b"]) == pytest.approx(float(phi[1]), rel=1e-12)
    distances = [np.sqrt(np.sum((th[0] - phi[0]) ** 2) + (th[1] - phi[1]) ** 2)
                 for th in thetas]
    assert metrics["distance"] == pytest.approx(float(share @ distances), rel=1e-6)


def test_with_one_update_at_the_end_it_is_reptile():
    """update_every = T: one update after T steps, phi - beta (phi - mean theta_T): Reptile."""
    x, y, w, b = data(1)
    batches = StepBatches((tf.constant(x), tf.constant(y)))
    cts = ContinualTrajectoryShifting(least_squares, params_of(w, b), inner_steps=STEPS,
                                      inner_learning_rate=0.1, meta_step_size=0.4,
                                      update_every=STEPS)
    reptile = Reptile(least_squares, params_of(w, b), inner_steps=STEPS,
                      inner_learning_rate=0.1, meta_step_size=0.4)
    cts.meta_step(batches)
    reptile.meta_step(batches)
    np.testing.assert_allclose(cts.initial_values()["w"], reptile.initial_values()["w"],
                               rtol=1e-12)


def linear(params, batch):
    return tf.reduce_sum(params["w"] * batch[0]) + params["b"] * batch[1]


def test_the_shift_is_exact_for_linear_losses_and_first_order_for_quadratics():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((2, STEPS, 3))
    g_b = rng.standard_normal((2, STEPS))
    alpha = 0.05
    learner = ContinualTrajectoryShifting(linear, params_of(np.zeros(3), 0.0),
                                          inner_steps=STEPS, inner_learning_rate=alpha,
                                          meta_step_size=0.5)
    metrics = learner.meta_step(StepBatches((tf.constant(g), tf.constant(g_b))))
    # restarted from the final phi, task m ends at phi - alpha sum_t g_{m,t}: the shifted one
    exact = [alpha * np.sqrt(np.sum(g[m].sum(0) ** 2) + g_b[m].sum() ** 2) for m in range(2)]
    assert metrics["distance"] == pytest.approx(np.mean(exact), rel=1e-6)

    # least squares: the shifted trajectory differs from the restarted one, to first order
    x, y, w, b = data(3, tasks=1)
    learner = ContinualTrajectoryShifting(least_squares, params_of(w, b), inner_steps=STEPS,
                                          inner_learning_rate=0.1, meta_step_size=0.5)
    metrics = learner.meta_step(StepBatches((tf.constant(x), tf.constant(y))))
    phi, thetas = authors_cts(w, b, x, y, [1.0], 0.1, 0.5, 1)
    restarted = [phi[0].copy(), np.array(phi[1])]
    for t in range(STEPS):
        r = x[0, t] @ restarted[0] + restarted[1] - y[0, t]
        restarted = [restarted[0] - 0.1 * x[0, t].T @ r / len(r), restarted[1] - 0.1 * r.mean()]
    gap = np.sqrt(np.sum((thetas[0][0] - restarted[0]) ** 2) + (thetas[0][1] - restarted[1]) ** 2)
    moved = np.sqrt(np.sum((phi[0] - w) ** 2) + (phi[1] - b) ** 2)
    assert 1e-4 * moved < gap < moved


def test_bad_settings_are_named():
    _, _, w, b = data(4)
    with pytest.raises(ValueError, match="update_every"):
        ContinualTrajectoryShifting(least_squares, params_of(w, b), inner_steps=4,
                                    update_every=5)
    with pytest.raises(ValueError, match="meta_step_size"):
        ContinualTrajectoryShifting(least_squares, params_of(w, b), meta_step_size=0.0)
