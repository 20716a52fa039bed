"""MetaPerturb's meta-training and transfer (keras_metapt.perturb_transfer).

References: float64 central finite differences of the one-step look-ahead objective
F(phi) = L_val(theta - lr grad_theta L_train(theta, phi), phi) for the second-order path; the
validation loss's gradient at the Adam-updated networks, recomputed from the classifiers'
pure functions, for the first-order path (through one SGD step on phi, so the applied update
is the gradient times the rate); one Adam step written out in NumPy for each task's network;
the identity regulariser leaving the logits unchanged; the annealing schedule min(1, (s+1)/A).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim, perturb_transfer as pt
from keras_metapt.hyper import MetaPerturb

RNG = np.random.default_rng(0)


def images(n, size=8, dtype=np.float32):
    return tf.constant(RNG.random((n, size, size, 1)).astype(dtype))


def labels(n, classes):
    return tf.constant(RNG.integers(0, classes, n).astype(np.int32))


@pytest.mark.parametrize("make", [lambda: pt.ConvClassifier(3, width=4, blocks=2, seed=1),
                                  lambda: pt.ResNetClassifier(3, width=2, seed=1)])
def test_regulariser_runs_at_every_site_and_identity_changes_nothing(make):
    classifier = make()
    x = images(6)
    seen = []

    def identity(h, site):
        seen.append((site, h.shape[-1]))
        return h

    plain = classifier.logits(classifier.values(), x).numpy()
    np.testing.assert_array_equal(classifier.logits(classifier.values(), x, identity).numpy(),
                                  plain)
    assert [s for s, _ in seen] == list(range(classifier.num_sites)) and plain.shape == (6, 3)


def test_copy_body_keeps_the_head():
    a, b = pt.ResNetClassifier(3, width=2, seed=1), pt.ResNetClassifier(3, width=2, seed=2)
    head = [v.numpy() for v in a.weight_list[-2:]]
    a.copy_body_from(b)
    for mine, theirs in zip(a.weight_list[:-2], b.weight_list[:-2]):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    for v, h in zip(a.weight_list[-2:], head):
        np.testing.assert_array_equal(v.numpy(), h)
    with pytest.raises(ValueError, match="same architecture"):
        a.copy_body_from(pt.ResNetClassifier(3, width=4))


def small_trainer(estimator=None, perturb_lr=0.0, sgd_phi=False):
    classifiers = [pt.ConvClassifier(k, width=3, blocks=2, seed=t) for t, k in enumerate((2, 3))]
    perturb = MetaPerturb(spatial_norm=8.0, seed=5)
    trainer = pt.SourceMetaTrainer(classifiers, perturb, learning_rate=0.01,
                                   perturb_learning_rate=perturb_lr, estimator=estimator,
                                   seed=3)
    if sgd_phi:
        trainer.perturb_optimizer = keras.optimizers.SGD(perturb_lr)
        trainer.perturb_optimizer.build(perturb.weight_variables())
    train = ((images(6), labels(6, 2)), (images(6), labels(6, 3)))
    val = ((images(6), labels(6, 2)), (images(6), labels(6, 3)))
    return trainer, train, val


def adam_first_step(value, grad, lr=0.01, eps=1e-7):
    """Keras' Adam at its first step: alpha = lr sqrt(1 - b2) / (1 - b1), m = (1 - b1) g,
    v = (1 - b2) g^2, value - alpha m / (sqrt(v) + eps)."""
    m, v = 0.1 * grad, 0.001 * grad ** 2
    return value - lr * np.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + eps)


def test_first_order_step_updates_each_task_by_adam_and_phi_by_the_validation_gradient():
    trainer, train, val = small_trainer(perturb_lr=0.5, sgd_phi=True)
    phi0 = [v.numpy() for v in trainer.perturb.weight_variables()]
    theta0 = [v.numpy() for v in trainer.variables]
    train_seed, val_seed, _ = pt._step_seeds(3, tf.constant(0, tf.int64), 3)
    phi_t = [tf.constant(p) for p in phi0]
    params = [tf.constant(t) for t in theta0]
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = trainer._mean_loss(params, phi_t, train, train_seed)
    grads = [g.numpy() * 2 for g in tape.gradient(loss, params)]  # each task's own gradient
    trainer.train_step(train, val)
    expected = [adam_first_step(t, g) for t, g in zip(theta0, grads)]
    for got, want in zip(trainer.variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # phi moved by -0.5 x d L_val(theta', phi) / d phi at the updated networks
    updated = [tf.constant(w, tf.float32) for w in expected]
    with tf.GradientTape() as tape:
        tape.watch(phi_t)
        outer = trainer._mean_loss(updated, phi_t, val, val_seed)
    for got, p, g in zip(trainer.perturb.weight_variables(), phi0,
                         tape.gradient(outer, phi_t)):
        np.testing.assert_allclose(got.numpy(), p - 0.5 * g.numpy(), rtol=1e-4, atol=1e-7)


def assert_central_differences(hypergrad, phi, objective, tensors, rtol, atol, h=1e-5):
    """hypergrad[i] at the first and last entry of each phi[i], i in ``tensors``, against
    (objective(phi + h e) - objective(phi - h e)) / 2h."""
    for i in tensors:
        flat = phi[i].numpy().reshape(-1)
        for j in (0, flat.size - 1):
            up, down = flat.copy(), flat.copy()
            up[j] += h
            down[j] -= h
            shape = phi[i].shape
            f_up = objective(phi[:i] + [tf.constant(up.reshape(shape))] + phi[i + 1:])
            f_down = objective(phi[:i] + [tf.constant(down.reshape(shape))] + phi[i + 1:])
            np.testing.assert_allclose(hypergrad[i].numpy().reshape(-1)[j],
                                       (f_up - f_down) / (2 * h), rtol=rtol, atol=atol)


def test_one_step_hypergradient_matches_float64_finite_differences():
    trainer, train, val = small_trainer(estimator=km.Unrolled(optim.sgd(0.01), 1))
    problem = trainer.problem()
    cast = lambda tree: tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float64) if t.dtype.is_floating else t, tree)
    params = cast([tf.convert_to_tensor(v) for v in trainer.variables])
    phi = [tf.constant(RNG.standard_normal(v.shape) * 0.3) for v in
           trainer.perturb.weight_variables()]
    seeds = pt._step_seeds(3, tf.constant(0, tf.int64), 2)
    inner_batch, outer_batch = cast(train) + (seeds[0],), cast(val) + (seeds[1],)
    result = km.Unrolled(optim.sgd(0.01), 1)(problem, params, phi, inner_batch, outer_batch)

    def objective(values):
        with tf.GradientTape() as tape:
            tape.watch(params)
            inner = problem.inner_loss(params, values, inner_batch)
        stepped = [p - 0.01 * g for p, g in zip(params, tape.gradient(inner, params))]
        return float(problem.outer_loss(stepped, values, outer_batch))

    assert_central_differences(result.hypergrad, phi, objective, (0, 3, 4, 5), rtol=1e-5,
                               atol=1e-9)


def keras_adam_step(param, grad, m, v, count, lr, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3's Adam update written out: m, v moved, then
    param - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps), t = count + 1."""
    t = count + 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    return param - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (tf.sqrt(v) + eps)


def test_adam_lookahead_hypergradient_matches_float64_finite_differences():
    """The look-ahead through the networks' own Adam (the twin of `optim.mirror_keras` after
    two real steps, so the moments are not zero) against float64 central differences of
    F(phi) = L_val(keras_adam_step(theta, grad L_train(theta, phi)), phi), the step written
    out above from the Keras optimizer's slots (the twin differs by O(epsilon): its
    eps_root = 1e-8 inside the square root, and Keras' epsilon sits outside the bias
    correction: rtol 1e-3)."""
    trainer, train, val = small_trainer()
    for _ in range(2):
        trainer.train_step(train, val)
    twin, (count, ms, vs) = optim.mirror_keras(trainer.optimizer, trainer.variables)
    assert int(count) == 2
    problem = trainer.problem()
    cast = lambda tree: tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float64) if t.dtype.is_floating else t, tree)
    params = cast([tf.convert_to_tensor(v) for v in trainer.variables])
    ms, vs = cast(ms), cast(vs)
    phi = [tf.constant(RNG.standard_normal(v.shape) * 0.3) for v in
           trainer.perturb.weight_variables()]
    seeds = pt._step_seeds(3, tf.constant(5, tf.int64), 2)
    inner_batch, outer_batch = cast(train) + (seeds[0],), cast(val) + (seeds[1],)
    result = km.Unrolled(twin, 1)(problem, params, phi, inner_batch, outer_batch,
                                  opt_state=(count, ms, vs))

    def objective(values):
        with tf.GradientTape() as tape:
            tape.watch(params)
            inner = problem.inner_loss(params, values, inner_batch)
        stepped = [keras_adam_step(p, g, m, v, 2, 0.01) for p, g, m, v in
                   zip(params, tape.gradient(inner, params), ms, vs)]
        return float(problem.outer_loss(stepped, values, outer_batch))

    assert_central_differences(result.hypergrad, phi, objective, (0, 3, 4, 5), rtol=1e-3,
                               atol=1e-8)


def test_trainer_with_estimator_from_optimizer_steps_phi_by_the_adam_lookahead():
    """estimator_from_optimizer, a wiring check: phi moves by -rate x the hypergradient of
    Unrolled(twin, 1) at the pre-step state (reference: that call made here, with the twin
    and state of `optim.mirror_keras` read before the step; the hypergradient itself is
    checked against finite differences above), and the networks then take their Adam step
    (reference: `keras_adam_step` written out from the pre-step moments, on each task's own
    gradient at the pre-step phi)."""
    trainer, train, val = small_trainer(perturb_lr=0.5, sgd_phi=True)
    trainer.train_step(train, val)  # moments not zero
    trainer.estimator_from_optimizer = lambda opt: km.Unrolled(opt, 1)
    trainer.train_step = tf.function(trainer._train_step)  # retrace with the new setting
    phi0 = [v.numpy() for v in trainer.perturb.weight_variables()]
    twin, state = optim.mirror_keras(trainer.optimizer, trainer.variables)
    seeds = pt._step_seeds(3, tf.constant(1, tf.int64), 3)
    want = km.Unrolled(twin, 1)(
        trainer.problem(), [tf.convert_to_tensor(v) for v in trainer.variables],
        trainer.perturb.hparams(), tuple(train) + (seeds[0],), tuple(val) + (seeds[1],),
        opt_state=state, seed=seeds[2]).hypergrad
    iterations = int(trainer.optimizer.iterations.numpy())
    theta0 = [tf.convert_to_tensor(v) for v in trainer.variables]
    _, (_, ms, vs) = optim.mirror_keras(trainer.optimizer, trainer.variables)
    phi_t = [tf.constant(p) for p in phi0]
    with tf.GradientTape() as tape:
        tape.watch(theta0)
        loss = trainer._mean_loss(theta0, phi_t, train, seeds[0])
    theta_want = [keras_adam_step(t, 2 * g, m, v, iterations, 0.01) for t, g, m, v in
                  zip(theta0, tape.gradient(loss, theta0), ms, vs)]
    trainer.train_step(train, val)
    for got, expected in zip(trainer.variables, theta_want):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    for got, p, g in zip(trainer.perturb.weight_variables(), phi0, want):
        np.testing.assert_allclose(got.numpy(), p - 0.5 * g.numpy(), rtol=1e-4, atol=1e-7)
    assert int(trainer.optimizer.iterations.numpy()) == iterations + 1
    with pytest.raises(ValueError, match="not both"):
        pt.SourceMetaTrainer(trainer.classifiers, trainer.perturb,
                             estimator=km.Unrolled(optim.sgd(0.01), 1),
                             estimator_from_optimizer=lambda opt: km.Unrolled(opt, 1))


def test_one_step_trainer_runs_and_moves_phi():
    trainer, train, val = small_trainer(estimator=km.Unrolled(optim.sgd(0.01), 1),
                                        perturb_lr=0.01)
    before = [v.numpy() for v in trainer.perturb.weight_variables()]
    loss, outer = trainer.train_step(train, val)
    assert np.isfinite(float(loss)) and np.isfinite(float(outer))
    assert all(np.abs(v.numpy() - b).max() > 0 for v, b in
               zip(trainer.perturb.weight_variables(), before))
    assert int(trainer.step.numpy()) == 1


def test_target_trainer_anneals_freezes_phi_and_averages_draws():
    perturb = MetaPerturb(spatial_norm=8.0, seed=1)
    phi = [v.numpy() for v in perturb.weight_variables()]
    trainer = pt.TargetTrainer(pt.ResNetClassifier(3, width=2, seed=0), regulariser="metaperturb",
                               perturb=perturb, anneal_steps=4, learning_rate=0.01)
    assert [float(trainer.noise_coeff(s)) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    x, y = images(8), labels(8, 3)
    for _ in range(3):
        trainer.train_step(x, y)
    for v, p in zip(perturb.weight_variables(), phi):
        np.testing.assert_array_equal(v.numpy(), p)
    xs, ys = RNG.random((9, 8, 8, 1)).astype(np.float32), RNG.integers(0, 3, 9)
    accuracy = trainer.accuracy(xs, ys, samples=3, batch_size=4)
    # the softmax averaged over draws (seed, start * 1000 + i), batches [0:4] and [4:9] (a
    # last batch of one joins the one before)
    params, hits = trainer.classifier.values(), 0
    for start, end in ((0, 4), (4, 9)):
        mean = sum(tf.nn.softmax(trainer.classifier.logits(params, tf.constant(xs[start:end]),
                   pt.metaperturb_regulariser(perturb, trainer.phi,
                                              tf.constant([0, start * 1000 + i], tf.int64), 4)))
                   for i in range(3)) / 3
        hits += int(np.sum(np.argmax(mean.numpy(), -1) == ys[start:end]))
    assert accuracy == hits / 9
    assert trainer.accuracy(xs, ys, samples=3, batch_size=4) == accuracy  # same draws


def test_unregularised_accuracy_is_one_pass_of_the_logits():
    trainer = pt.TargetTrainer(pt.ResNetClassifier(3, width=2, seed=0))
    xs, ys = RNG.random((6, 8, 8, 1)).astype(np.float32), RNG.integers(0, 3, 6)
    logits = trainer.classifier.logits(trainer.classifier.values(), tf.constant(xs)).numpy()
    assert trainer.accuracy(xs, ys, samples=5, batch_size=6) == np.mean(logits.argmax(-1) == ys)
    with pytest.raises(ValueError, match="at least 2"):
        trainer.accuracy(xs, ys, batch_size=1)


def test_target_trainer_refuses_bad_settings():
    classifier = pt.ResNetClassifier(3, width=2)
    with pytest.raises(ValueError, match="regulariser must be one of"):
        pt.TargetTrainer(classifier, regulariser="mixup")
    with pytest.raises(ValueError, match="needs a perturb"):
        pt.TargetTrainer(classifier, regulariser="metaperturb")
    with pytest.raises(ValueError, match="dropout_rate"):
        pt.TargetTrainer(classifier, regulariser="dropout", dropout_rate=1.0)
