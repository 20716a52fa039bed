"""Reptile and ARUBA (keras_metapt.taskmeta.Reptile, ARUBA).

References (float64): least-squares tasks L(theta; X, y) = 1/2 mean((X w + b - y)^2) with
one minibatch per inner step, adapted by a NumPy loop of SGD steps written here with the
gradient in closed form (X^T r / n, mean r). Reptile: phi + eps (sum_m w_m theta_T^m - phi).
ARUBA: an independent NumPy transcription of the authors' update rules: their Reptile
optimiser (slots bsq = eps^2, gsq = zeta^2, eta = eps / zeta with eps = lr * zeta; every inner
step subtracts eta * g and adds g^2 to gsq; at a task's end bsq += (theta_T - phi)^2 / 2 +
eps^2 / (t + 1)^p, gsq += zeta^2 / (t + 1)^p, t += 1, eta = sqrt(bsq / gsq)) with one task
per meta-batch, and their federated code (eta fixed for a round, per-client state updates,
the clients' average weighted by data size).
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.hypergrad import StepBatches
from keras_metapt.taskmeta import ARUBA, Reptile

FEATURES, STEPS, BATCH = 4, 3, 6


def least_squares(params, batch):
    x, y = batch
    r = tf.linalg.matvec(x, params["w"]) + params["b"] - y
    return 0.5 * tf.reduce_mean(tf.square(r))


def family(seed, tasks):
    """Task m's minibatches [T, BATCH, ...]: y = X w_m + b_m + noise, w_m scattered around a
    shared centre (what an initialisation can learn)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(FEATURES)
    x = rng.standard_normal((tasks, STEPS, BATCH, FEATURES)) * np.array([1.0, 0.3, 2.0, 0.7])
    w = centre + 0.5 * rng.standard_normal((tasks, FEATURES))
    y = np.einsum("mtbf,mf->mtb", x, w) + 0.1 * rng.standard_normal((tasks, STEPS, BATCH))
    return x, y


def numpy_sgd(phi_w, phi_b, x, y, eta_w, eta_b):
    """(w_T, b_T, sum g_w^2, sum g_b^2): SGD over the task's T minibatches."""
    w, b = phi_w.copy(), float(phi_b)
    sq_w, sq_b = np.zeros_like(w), 0.0
    for t in range(len(x)):
        r = x[t] @ w + b - y[t]
        g_w, g_b = x[t].T @ r / len(r), r.mean()
        sq_w, sq_b = sq_w + g_w ** 2, sq_b + g_b ** 2
        w, b = w - eta_w * g_w, b - eta_b * g_b
    return w, b, sq_w, sq_b


def initial(seed):
    rng = np.random.default_rng(seed + 100)
    return rng.standard_normal(FEATURES), float(rng.standard_normal())


def params_of(w, b):
    return {"w": tf.constant(w), "b": tf.constant(b, tf.float64)}


def meta_batch(x, y, tasks):
    return StepBatches((tf.constant(x[tasks]), tf.constant(y[tasks])))


def test_reptile_moves_phi_toward_the_weighted_adapted_weights():
    x, y = family(0, 3)
    w0, b0 = initial(0)
    learner = Reptile(least_squares, params_of(w0, b0), inner_steps=STEPS,
                      inner_learning_rate=0.1, meta_step_size=0.4)
    weights = np.array([3.0, 1.0, 1.0])
    metrics = learner.meta_step(meta_batch(x, y, [0, 1, 2]), task_weights=weights)
    adapted = [numpy_sgd(w0, b0, x[m], y[m], 0.1, 0.1) for m in range(3)]
    share = weights / weights.sum()
    target_w = sum(s * a[0] for s, a in zip(share, adapted))
    target_b = sum(s * a[1] for s, a in zip(share, adapted))
    phi = learner.initial_values()
    np.testing.assert_allclose(phi["w"], w0 + 0.4 * (target_w - w0), rtol=1e-12)
    assert float(phi["b"]) == pytest.approx(b0 + 0.4 * (target_b - b0), rel=1e-12)
    distances = [np.sqrt(np.sum((a[0] - w0) ** 2) + (a[1] - b0) ** 2) for a in adapted]
    assert metrics["distance"] == pytest.approx(float(share @ distances), rel=1e-6)


class AuthorsReptileARUBA:
    """The authors' Reptile-ARUBA optimiser slots and rules, transcribed (one task per
    meta-batch)."""

    def __init__(self, w, b, lr, zeta, p):
        self.eps, self.zeta, self.p = lr * zeta, zeta, p
        self.phi = [w.copy(), np.array(b)]
        self.bsq = [np.full_like(v, self.eps ** 2) for v in self.phi]
        self.gsq = [np.full_like(v, self.zeta ** 2) for v in self.phi]
        self.eta = [np.full_like(v, self.eps / self.zeta) for v in self.phi]
        self.task = 1

    def task_step(self, x, y, meta_step_size):
        var = [v.copy() for v in self.phi]
        for t in range(len(x)):
            r = x[t] @ var[0] + var[1] - y[t]
            grads = [x[t].T @ r / len(r), np.array(r.mean())]
            for i, g in enumerate(grads):
                var[i] = var[i] - self.eta[i] * g
                self.gsq[i] = self.gsq[i] + g ** 2
        extra = 1.0 / (self.task + 1) ** self.p
        for i in range(2):
            self.bsq[i] = self.bsq[i] + 0.5 * (var[i] - self.phi[i]) ** 2 + self.eps ** 2 * extra
            self.gsq[i] = self.gsq[i] + self.zeta ** 2 * extra
            self.eta[i] = np.sqrt(self.bsq[i] / self.gsq[i])
        self.task += 1
        self.phi = [p + meta_step_size * (v - p) for p, v in zip(self.phi, var)]


def test_aruba_on_reptile_matches_the_authors_update_rules_over_several_tasks():
    x, y = family(1, 4)
    w0, b0 = initial(1)
    learner = ARUBA(least_squares, params_of(w0, b0), inner_steps=STEPS,
                    inner_learning_rate=0.05, meta_step_size=0.5, zeta=0.7, power=0.8)
    reference = AuthorsReptileARUBA(w0, b0, lr=0.05, zeta=0.7, p=0.8)
    for m in range(4):
        metrics = learner.meta_step(meta_batch(x, y, [m]))
        reference.task_step(x[m], y[m], 0.5)
    phi = learner.initial_values()
    np.testing.assert_allclose(phi["w"], reference.phi[0], rtol=1e-12)
    np.testing.assert_allclose(float(phi["b"]), reference.phi[1], rtol=1e-12)
    eta = learner.step_sizes()
    np.testing.assert_allclose(eta["w"], reference.eta[0], rtol=1e-12)
    np.testing.assert_allclose(eta["b"], reference.eta[1], rtol=1e-12)
    # the learned rates differ by coordinate: the features' scales differ
    assert np.ptp(eta["w"]) > 0.1 * np.mean(eta["w"])
    assert metrics["mean_step_size"] == pytest.approx(
        np.concatenate([reference.eta[0], [reference.eta[1]]]).mean(), rel=1e-6)
    assert int(learner.task_count) == 5


def test_aruba_adapt_uses_the_learned_per_coordinate_step_sizes():
    x, y = family(2, 2)
    w0, b0 = initial(2)
    learner = ARUBA(least_squares, params_of(w0, b0), inner_steps=STEPS,
                    inner_learning_rate=0.05)
    learner.meta_step(meta_batch(x, y, [0]))
    eta = learner.step_sizes()
    phi = learner.initial_values()
    adapted = learner.adapt(StepBatches((tf.constant(x[1]), tf.constant(y[1]))))
    w, b, _, _ = numpy_sgd(phi["w"].numpy(), float(phi["b"]), x[1], y[1], eta["w"].numpy(),
                           float(eta["b"]))
    np.testing.assert_allclose(adapted["w"], w, rtol=1e-12)
    assert float(adapted["b"]) == pytest.approx(b, rel=1e-12)


def test_aruba_federated_averaging_matches_the_authors_round():
    """meta_step_size=1 and task_weights = client sizes: one round of the authors' federated
    code (eta fixed during the round, state updated client by client, size-weighted mean)."""
    x, y = family(3, 3)
    w0, b0 = initial(3)
    sizes = np.array([10.0, 30.0, 20.0])
    lr, zeta, p = 0.05, 1.3, 1.0
    learner = ARUBA(least_squares, params_of(w0, b0), inner_steps=STEPS,
                    inner_learning_rate=lr, meta_step_size=1.0, zeta=zeta, power=p)
    learner.meta_step(meta_batch(x, y, [0, 1, 2]), task_weights=sizes)
    eps = lr * zeta
    bsq = [np.full(FEATURES, eps ** 2), eps ** 2]
    gsq = [np.full(FEATURES, zeta ** 2), zeta ** 2]
    t, out_w, out_b = 1, 0.0, 0.0
    for m in range(3):
        w, b, sq_w, sq_b = numpy_sgd(w0, b0, x[m], y[m], eps / zeta, eps / zeta)
        extra = 1.0 / (t + 1) ** p
        bsq = [bsq[0] + (w - w0) ** 2 / 2 + eps ** 2 * extra,
               bsq[1] + (b - b0) ** 2 / 2 + eps ** 2 * extra]
        gsq = [gsq[0] + sq_w + zeta ** 2 * extra, gsq[1] + sq_b + zeta ** 2 * extra]
        t += 1
        out_w, out_b = out_w + sizes[m] * w, out_b + sizes[m] * b
    phi = learner.initial_values()
    np.testing.assert_allclose(phi["w"], out_w / sizes.sum(), rtol=1e-12)
    assert float(phi["b"]) == pytest.approx(out_b / sizes.sum(), rel=1e-12)
    eta = learner.step_sizes()
    np.testing.assert_allclose(eta["w"], np.sqrt(bsq[0] / gsq[0]), rtol=1e-12)
    np.testing.assert_allclose(eta["b"], np.sqrt(bsq[1] / gsq[1]), rtol=1e-12)


def test_train_with_sgd_collects_state_but_steps_with_the_constant_rate():
    x, y = family(4, 1)
    w0, b0 = initial(4)
    learner = ARUBA(least_squares, params_of(w0, b0), inner_steps=STEPS,
                    inner_learning_rate=0.05, meta_step_size=1.0, train_with_sgd=True)
    learner.meta_step(meta_batch(x, y, [0]))
    w, b, _, _ = numpy_sgd(w0, b0, x[0], y[0], 0.05, 0.05)
    np.testing.assert_allclose(learner.initial_values()["w"], w, rtol=1e-12)
    assert not np.allclose(learner.step_sizes()["w"], 0.05)


def test_bad_settings_are_named():
    w0, b0 = initial(5)
    with pytest.raises(ValueError, match="meta_step_size"):
        Reptile(least_squares, params_of(w0, b0), meta_step_size=1.5)
    with pytest.raises(ValueError, match="zeta"):
        ARUBA(least_squares, params_of(w0, b0), zeta=0.0)


def test_leaves_kept_at_their_initial_value_stay_there_and_the_others_learn_as_before():
    """Reference: a plain Reptile whose b is assigned back to its first value after every
    meta-step, by hand; ``keep_at_initial_value`` must give the same w, and b unchanged."""
    x, y = family(5, 2)
    phi = {"w": np.zeros(FEATURES), "b": np.array(0.5)}
    held = Reptile(least_squares, phi, inner_steps=STEPS, inner_learning_rate=0.05,
                   meta_step_size=0.5)
    held.keep_at_initial_value([0])  # flat order: b, w
    plain = Reptile(least_squares, phi, inner_steps=STEPS, inner_learning_rate=0.05,
                    meta_step_size=0.5)
    support = StepBatches((tf.constant(x), tf.constant(y)))
    for _ in range(3):
        held.meta_step(support)
        plain.meta_step(support)
        assert plain.initialisation[0].numpy() != 0.5  # b would move
        plain.initialisation[0].assign(0.5)
        np.testing.assert_array_equal(held.initialisation[0].numpy(), 0.5)
        np.testing.assert_allclose(held.initialisation[1].numpy(),
                                   plain.initialisation[1].numpy(), rtol=1e-12)
    assert np.abs(held.initialisation[1].numpy()).max() > 0
