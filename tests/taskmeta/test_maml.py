"""MAML and first-order MAML (keras_metapt.taskmeta.MAML).

References (float64, closed forms): on quadratic tasks L_S(theta) = 1/2 (theta - c)^T A
(theta - c), L_Q(theta) = 1/2 (theta - d)^T B (theta - d), T SGD steps of size alpha give
theta_T = c + (I - alpha A)^T (phi - c); MAML's meta-gradient is (I - alpha A)^T B (theta_T - d)
and first-order MAML's B (theta_T - d). With a Keras SGD meta-optimizer of rate beta one
meta-step moves phi by -beta times the task-weighted mean of them.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hypergrad import StepBatches
from keras_metapt.taskmeta import MAML, sgd_adapt

DIM = 5


def quadratic_loss(params, batch):
    """1/2 (theta - c)^T A (theta - c) with theta the concatenated {"w": [3], "b": [2]}."""
    theta = tf.concat([params["w"], params["b"]], 0)
    matrix, centre = batch
    r = theta - centre
    return 0.5 * tf.reduce_sum(r * tf.linalg.matvec(matrix, r))


def spd(rng, m):
    q = rng.standard_normal((m, DIM, DIM))
    return np.einsum("mij,mkj->mik", q, q) / DIM + 0.2 * np.eye(DIM)


def tasks(seed, m=3):
    rng = np.random.default_rng(seed)
    support = (spd(rng, m), rng.standard_normal((m, DIM)))
    query = (spd(rng, m), rng.standard_normal((m, DIM)))
    phi = rng.standard_normal(DIM)
    return support, query, phi


def split(phi):
    return {"w": tf.constant(phi[:3]), "b": tf.constant(phi[3:])}


def closed_form(phi, support, query, alpha, steps, first_order):
    a, c = support
    b, d = query
    contraction = np.linalg.matrix_power(np.eye(DIM) - alpha * a, steps)
    theta = c + contraction @ (phi - c)
    grad = b @ (theta - d)
    return grad if first_order else contraction.T @ grad


def test_sgd_adapt_matches_the_closed_form_and_sums_squared_gradients():
    support, _, phi = tasks(0, m=1)
    a, c = support[0][0], support[1][0]
    theta, squares = sgd_adapt(quadratic_loss, split(phi), (tf.constant(a), tf.constant(c)),
                               4, 0.3)
    expected, sq = phi.copy(), np.zeros(DIM)
    for _ in range(4):
        g = a @ (expected - c)
        sq += g ** 2
        expected = expected - 0.3 * g
    got = np.concatenate([theta["w"].numpy(), theta["b"].numpy()])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([squares["w"], squares["b"]]), sq, rtol=1e-12)


@pytest.mark.parametrize("first_order,backward", [(False, "reverse"), (False, "mixed"),
                                                   (True, "reverse")])
def test_a_meta_step_moves_phi_by_the_closed_form_meta_gradient(first_order, backward):
    support, query, phi = tasks(1)
    alpha, steps, beta = 0.2, 3, 0.5
    weights = np.array([1.0, 2.0, 5.0])
    learner = MAML(quadratic_loss, split(phi), inner_steps=steps, inner_learning_rate=alpha,
                   meta_optimizer=keras.optimizers.SGD(beta), first_order=first_order,
                   backward=backward)
    metrics = learner.meta_step(tf.nest.map_structure(tf.constant, support),
                                tf.nest.map_structure(tf.constant, query), task_weights=weights)
    w = weights / weights.sum()
    grads = [closed_form(phi, (support[0][m], support[1][m]), (query[0][m], query[1][m]),
                         alpha, steps, first_order) for m in range(3)]
    expected = phi - beta * sum(wm * g for wm, g in zip(w, grads))
    new = learner.initial_values()
    np.testing.assert_allclose(np.concatenate([new["w"], new["b"]]), expected, rtol=1e-10)
    losses = []
    for m in range(3):
        a, c = support[0][m], support[1][m]
        theta = c + np.linalg.matrix_power(np.eye(DIM) - alpha * a, steps) @ (phi - c)
        r = theta - query[1][m]
        losses.append(0.5 * r @ query[0][m] @ r)
    assert metrics["query_loss"] == pytest.approx(float(w @ losses), rel=1e-6)
    assert int(learner.meta_steps) == 1


def test_second_order_differs_from_first_order_where_the_hessian_matters():
    support, query, phi = tasks(2)
    args = (phi, (support[0][0], support[1][0]), (query[0][0], query[1][0]), 0.3, 4)
    second, first = closed_form(*args, False), closed_form(*args, True)
    assert np.linalg.norm(second - first) > 0.1 * np.linalg.norm(first)


def test_adapt_runs_sgd_from_phi_without_moving_it():
    support, _, phi = tasks(3, m=1)
    learner = MAML(quadratic_loss, split(phi), inner_steps=2, inner_learning_rate=0.1)
    batch = (tf.constant(support[0][0]), tf.constant(support[1][0]))
    adapted = learner.adapt(batch, num_steps=6)
    a, c = support[0][0], support[1][0]
    expected = c + np.linalg.matrix_power(np.eye(DIM) - 0.1 * a, 6) @ (phi - c)
    np.testing.assert_allclose(np.concatenate([adapted["w"], adapted["b"]]), expected,
                               rtol=1e-10)
    current = learner.initial_values()
    np.testing.assert_array_equal(np.concatenate([current["w"], current["b"]]), phi)


def test_step_batches_give_one_support_batch_per_inner_step():
    """Reference: the per-step loop with batch t at step t (closed form per step)."""
    rng = np.random.default_rng(4)
    steps = 3
    a = spd(rng, 2 * steps).reshape(2, steps, DIM, DIM)
    c = rng.standard_normal((2, steps, DIM))
    phi = rng.standard_normal(DIM)
    learner = MAML(quadratic_loss, split(phi), inner_steps=steps, inner_learning_rate=0.2)
    adapted = learner.adapt(StepBatches((tf.constant(a[0]), tf.constant(c[0]))))
    theta = phi.copy()
    for t in range(steps):
        theta = theta - 0.2 * a[0, t] @ (theta - c[0, t])
    np.testing.assert_allclose(np.concatenate([adapted["w"], adapted["b"]]), theta, rtol=1e-10)


def test_bad_inputs_are_named():
    support, query, phi = tasks(5)
    learner = MAML(quadratic_loss, split(phi))
    with pytest.raises(ValueError, match="query"):
        learner.meta_step(tf.nest.map_structure(tf.constant, support))
    with pytest.raises(ValueError, match="task_weights"):
        learner.meta_step(tf.nest.map_structure(tf.constant, support),
                          tf.nest.map_structure(tf.constant, query), task_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(quadratic_loss, split(phi), inner_steps=0)
