"""MetaPretrainer: the hyperstep, fit() end to end, resumption, memory, bad input.

References: an independent float64 computation with explicit Hessians (below); a synthetic
multitask problem with known helpful tasks (tests.meta_pt_toy.synthetic_tasks); an
uninterrupted run for resumption; the process's resident memory for leaks.
"""

import functools
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import keras_metapt as km
from keras_metapt.callbacks import MetaCheckpoint, MetaParameterSummaries, TaskWeightsPlot
from keras_metapt.hyper import TaskWeights
from keras_metapt.losses import masked_multitask_bce
from tests import meta_pt_toy
from tests.conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- the hyperstep


def tiny_float64_model(unroll_steps, neumann_terms, alpha, ft_unroll_optimizer="sgd",
                       solve=None, pt_optimizer="adam", online=None):
    keras.utils.set_random_seed(3)
    f64 = "float64"  # Inputs too: a float32 keras.Input would cast float64 features down
    encoder = keras.Sequential([keras.Input((3,), dtype=f64), keras.layers.Dense(4, activation="tanh", dtype=f64)])
    pt_head = keras.Sequential([keras.Input((4,), dtype=f64), keras.layers.Dense(3, dtype=f64)])
    ft_head = keras.Sequential([keras.Input((4,), dtype=f64), keras.layers.Dense(1, dtype=f64)])
    weights = TaskWeights(3, dtype="float64")
    weights.logits.assign([0.3, -0.2, 0.1])
    model = km.MetaPretrainer(
        encoder, pt_head, ft_head, weights,
        pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w),
        ft_loss=lambda y, p: 0.5 * tf.reduce_mean((p - y) ** 2),
        unroll_steps=unroll_steps,
        solve=solve if solve is not None or online is not None
        else km.linalg.neumann(neumann_terms, alpha),
        ft_unroll_optimizer=km.optim.sgd(0.2) if ft_unroll_optimizer == "sgd" else None,
        online=online)
    model.compile(pt_optimizer, jit_compile=False)
    return model


def tiny_data(unroll_steps):
    rng = np.random.default_rng(5)
    y_pt = (rng.random((10, 3)) < 0.5).astype(np.float64)
    y_pt[0, 1] = np.nan  # a missing label, masked
    return {
        "pt": (rng.normal(size=(10, 3)), y_pt),
        "pt_fresh": (rng.normal(size=(10, 3)), y_pt[::-1].copy()),
        # meta_dataset's layout: [batch, K, ...]
        "meta_train": (rng.normal(size=(6, unroll_steps, 3)), rng.normal(size=(6, unroll_steps, 1))),
        "meta_val": (rng.normal(size=(7, 3)), rng.normal(size=(7, 1))),
    }


def sgd_unroll_update(psi, grads, k):
    return [p - 0.2 * g for p, g in zip(psi, grads)]


def explicit_pt_hessian(model, data, phi):
    """The PT Hessian over (encoder, PT head) and the mixed Jacobian, by tf jacobians."""
    pt_vars = model.encoder.trainable_variables + model.pt_head.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            x, y = data["pt_fresh"]
            preds = model.pt_head(model.encoder(x, training=False), training=False)
            loss = masked_multitask_bce(y, preds, 2.0 * tf.sigmoid(phi))
        grads = inner.gradient(loss, pt_vars)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    size = int(flat.shape[0])
    hessian = np.concatenate([j.numpy().reshape(size, -1) for j in outer.jacobian(flat, pt_vars)], 1)
    return hessian, outer.jacobian(flat, phi).numpy()


def independent_hypergradient(model, data, unroll_steps, neumann_terms, alpha,
                              unroll_update=sgd_unroll_update, precondition=None):
    """Explicit-matrix float64 computation, using the Keras layers' variables directly.
    ``precondition(rhs)``: instead of the Neumann series, H^-1 rhs ~ precondition(rhs)."""
    enc_vars = model.encoder.trainable_variables
    pt_vars = enc_vars + model.pt_head.trainable_variables
    phi = model.meta_layer.logits
    kernel, bias = [tf.constant(v.numpy()) for v in model.ft_head.trainable_variables]

    with tf.GradientTape() as tape:  # g_FT through the FT unroll, written out
        psi = [kernel, bias]
        for k in range(unroll_steps):
            x, y = data["meta_train"][0][:, k], data["meta_train"][1][:, k]
            feats = model.encoder(x, training=False)
            with tf.GradientTape() as inner:
                inner.watch(psi)
                loss = 0.5 * tf.reduce_mean((tf.matmul(feats, psi[0]) + psi[1] - y) ** 2)
            psi = unroll_update(psi, inner.gradient(loss, psi), k)
        x, y = data["meta_val"]
        val = 0.5 * tf.reduce_mean((tf.matmul(model.encoder(x, training=False), psi[0]) + psi[1] - y) ** 2)
    g_e = np.concatenate([g.numpy().ravel() for g in tape.gradient(val, enc_vars)])

    hessian, mixed = explicit_pt_hessian(model, data, phi)
    size = hessian.shape[0]
    rhs = np.concatenate([g_e, np.zeros(size - g_e.size)])
    if precondition is not None:
        return -mixed.T @ precondition(rhs), psi
    term, total = rhs.copy(), rhs.copy()
    for _ in range(neumann_terms):
        term = term - alpha * hessian @ term
        total += term
    return -mixed.T @ (alpha * total), psi


@pytest.mark.parametrize("unroll_steps,neumann_terms", [(1, 1), (2, 2)])
def test_hyperstep_hypergradient_matches_explicit_float64_computation(unroll_steps, neumann_terms):
    model = tiny_float64_model(unroll_steps, neumann_terms, alpha=0.1)
    data = tiny_data(unroll_steps)
    result = model.hypergradient(data)
    expected, psi_k = independent_hypergradient(model, data, unroll_steps, neumann_terms, 0.1)
    assert rel_err(result.hypergrad[0], expected) < 1e-5
    for got, ref in zip(result.params[2], psi_k):
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_hyperstep_updates_phi_and_psi_but_not_batchnorm_statistics():
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                keras.layers.BatchNormalization(), keras.layers.ReLU()])
    model = km.MetaPretrainer(
        encoder, keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]), TaskWeights(3),
        pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w),
        ft_loss=lambda y, p: tf.reduce_mean((p - y) ** 2))
    model.compile(jit_compile=False)
    data = tf.nest.map_structure(lambda a: tf.constant(a, tf.float32), tiny_data(1))
    stats = [v.numpy().copy() for v in encoder.non_trainable_variables]
    phi, psi = model.meta_parameters()[0], [v.numpy().copy() for v in model.ft_head.trainable_variables]
    model._hyperstep(data)
    for before, var in zip(stats, encoder.non_trainable_variables):
        np.testing.assert_array_equal(before, var.numpy())
    assert not np.allclose(phi, model.meta_parameters()[0])
    assert not np.allclose(psi[0], model.ft_head.trainable_variables[0].numpy())


def fit_with_ft_head_statistics(updates, steps=4):
    """A MetaPretrainer (Dense -> BatchNorm -> Dropout encoder, PT learning rate 0) fitted
    ``steps`` regular steps; returns (encoder, FT head weights at the start and at the end,
    expected moving mean and variance), the expectation written out in NumPy as the
    exponential average (momentum 0.9) of the batch moments of Dense(x) over the batches
    that may update them: PT and MetaTrain batches alternating (updates=True, the official
    code's train mode) or PT batches alone (False, as plain PT)."""
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                keras.layers.BatchNormalization(momentum=0.9),
                                keras.layers.Dropout(0.5, seed=1)])
    ft_head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model = km.MetaPretrainer(
        encoder, keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), ft_head,
        TaskWeights(3), pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w),
        ft_loss=lambda y, p: tf.reduce_mean((p - y) ** 2), hyperstep_every=1000,
        ft_head_updates_statistics=updates)
    model.compile(keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.1), jit_compile=False)
    kernel, bias = (v.numpy().astype(np.float64) for v in encoder.layers[0].weights)
    head_start = ft_head.get_weights()
    rng = np.random.default_rng(1)
    x_pt = rng.normal(2.0, 1.5, size=(steps * 8, 3)).astype(np.float32)
    y_pt = (rng.random((steps * 8, 3)) < 0.5).astype(np.float32)
    x_ft = rng.normal(-1.0, 0.5, size=(steps * 4, 3)).astype(np.float32)
    y_ft = rng.normal(size=(steps * 4, 1)).astype(np.float32)
    def batched(arrays, size):
        return tf.data.Dataset.from_tensor_slices(arrays).batch(size, drop_remainder=True)

    stream = km.meta_dataset(batched((x_pt, y_pt), 8), batched((x_ft, y_ft), 4),
                             batched((x_ft, y_ft), 4))
    model.fit(stream, epochs=1, steps_per_epoch=steps, verbose=0)

    mean, var = np.zeros(4), np.ones(4)
    for t in range(steps):
        batches = [x_pt[8 * t:8 * t + 8]] + [x_ft[4 * t:4 * t + 4]] * updates
        for x in batches:
            h = x.astype(np.float64) @ kernel + bias
            mean = 0.9 * mean + 0.1 * h.mean(0)
            var = 0.9 * var + 0.1 * h.var(0)  # Keras: the biased batch variance
    return encoder, (head_start, ft_head.get_weights()), mean, var


@pytest.mark.parametrize("updates", [True, False])
def test_ft_head_steps_update_moving_statistics_only_when_asked(updates):
    """Reference: the NumPy exponential average of `fit_with_ft_head_statistics`."""
    encoder, _, mean, var = fit_with_ft_head_statistics(updates)
    bn = encoder.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5)


def test_ft_head_trains_the_same_whether_or_not_its_steps_update_statistics():
    """Reference: the run with updates=True; the FT-head step's features use batch
    statistics in both and the dropout seed advances in both (the same masks), so only
    BatchNorm's moving statistics differ (and the head moved)."""
    (start, with_updates), (_, without) = (fit_with_ft_head_statistics(u)[1]
                                          for u in (True, False))
    assert not np.allclose(start[0], with_updates[0])
    for a, b in zip(with_updates, without):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- fit end to end


def run_toy(seed, epochs, jit_compile=False, callbacks=(), steps=50, **build_kwargs):
    x, y, x_ft, y_ft, helpful = meta_pt_toy.synthetic_tasks(seed)
    model = meta_pt_toy.build(seed, y.shape[1], jit_compile=jit_compile, **build_kwargs)
    history = model.fit(meta_pt_toy.stream(seed, x, y, x_ft, y_ft), epochs=epochs,
                        steps_per_epoch=steps, verbose=0, callbacks=list(callbacks))
    return model, history, helpful


def test_learned_weights_separate_helpful_tasks():
    # Ground truth: tasks 0-9 are noisy copies of the FT rule; 10-19 distractors; 20-29 noise.
    aucs = []
    for seed in range(3):
        model, history, helpful = run_toy(seed, epochs=12)
        aucs.append(roc_auc_score(helpful, model.meta_layer.task_weights()))
        assert history.history["hypersteps"][-1] == 50  # N=1 after one warm-up epoch
    assert np.mean(aucs) >= 0.9, aucs


def test_xla_and_graph_runs_give_the_same_phi(tmp_path):
    xla, hx, _ = run_toy(1, epochs=2, jit_compile=True)
    graph, hg, _ = run_toy(1, epochs=2, jit_compile=False)
    np.testing.assert_allclose(xla.meta_parameters()[0], graph.meta_parameters()[0], atol=1e-5)
    assert hx.history["hypersteps"][-1] == 50 and not np.allclose(xla.meta_parameters()[0], 0.0)


def test_host_dispatch_and_in_graph_choice_give_the_same_phi():
    # Reference: the in-graph tf.cond path (steps_per_execution > 1) on the same schedule:
    # warm-up 10 steps, then a hyperstep every 3 steps.
    results = []
    for spe in (1, 5):
        model, history, _ = run_toy(2, epochs=2, steps=20, warmup_steps=10, hyperstep_every=3,
                                    steps_per_execution=spe)
        results.append(model.meta_parameters()[0])
        assert history.history["hypersteps"] == [4, 6]  # steps 10,13,16,19 | 22,25,...,37
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_memory_flat_and_no_retracing_over_many_hypersteps():
    traces = []

    class Rss(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.mib = []

        def on_epoch_end(self, epoch, logs=None):
            with open("/proc/self/status") as f:
                self.mib.append(next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024)

    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0)
    model = meta_pt_toy.build(0, y.shape[1], jit_compile=True, warmup_steps=0)
    for name in ("_regular_train_step", "_hyper_train_step"):  # their Python runs at trace only
        original = getattr(model, name)
        setattr(model, name, lambda data, f=original, n=name: (traces.append(n), f(data))[1])
    rss = Rss()
    model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=12, steps_per_epoch=100, verbose=0,
              callbacks=[rss])
    assert int(model.meta_step.numpy()) == 1200 and sorted(traces) == ["_hyper_train_step"]
    growth = rss.mib[-1] - rss.mib[2]  # after 900 more hypersteps
    assert growth < 25, rss.mib


def test_callbacks_write_tensorboard_summaries_and_plot(tmp_path):
    log_dir, png = str(tmp_path / "tb"), str(tmp_path / "weights.png")
    run_toy(0, epochs=2, steps=10, callbacks=[keras.callbacks.TensorBoard(log_dir),
                                              MetaParameterSummaries(log_dir), TaskWeightsPlot(png)])
    tags = set()
    for root, _, files in os.walk(os.path.join(log_dir, "meta")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags.update(v.tag for v in event.summary.value)
    assert {"task_weights", "task_weight_mean", "task_weight_min", "task_weight_max"} <= tags
    assert os.path.getsize(png) > 10_000


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir()
    killed.mkdir()
    cmd = [sys.executable, "-m", "tests.meta_pt_toy"]
    subprocess.run(cmd + [str(full), "5"], cwd=ROOT, check=True, timeout=300, capture_output=True)
    proc = subprocess.Popen(cmd + [str(killed), "5", "--sleep", "0.02"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "ckpt" / "latest.json"
    deadline = time.time() + 240
    while not (latest.exists() and '"epoch": 2' in latest.read_text()):
        assert proc.poll() is None and time.time() < deadline, "run ended before epoch 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # really killed, mid-run
    proc.wait()
    assert not (killed / "phi.npy").exists()
    resumed = subprocess.run(cmd + [str(killed), "5"], cwd=ROOT, timeout=300, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    np.testing.assert_array_equal(np.load(killed / "phi.npy"), np.load(full / "phi.npy"))


# --------------------------------------------------------------------------- bad input


def test_meta_dataset_layout():
    """Reference: the stream written out by hand, for unshuffled inputs: element t holds PT
    batch b_t as "pt" and b_(t+1) as "pt_fresh" (across the repeat boundary too), the K = 2
    MetaTrain batches t*K, t*K + 1 stacked on axis 1, MetaVal batch t; a PT spec with an
    unknown dimension (padded batches) keeps it; ragged PT batches have the same layout."""

    def pt_example(i):  # examples of length i % 3 + 1, padded per batch
        return tf.fill([i % 3 + 1], i)

    pt = tf.data.Dataset.range(7).map(pt_example).padded_batch(2, drop_remainder=True)
    meta_train = tf.data.Dataset.range(100, 110).batch(2, drop_remainder=True)
    meta_val = tf.data.Dataset.range(200, 210).batch(2, drop_remainder=True)
    stream = km.meta_dataset(pt, meta_train, meta_val, unroll_steps=2)
    assert stream.element_spec["pt"].shape.as_list() == [2, None]
    batches = [b.numpy() for b in pt]  # b_0, b_1, b_2 (the 7th example is dropped)
    it = iter(stream)
    for t in range(7):
        element = next(it)
        np.testing.assert_array_equal(element["pt"].numpy(), batches[t % 3])
        np.testing.assert_array_equal(element["pt_fresh"].numpy(), batches[(t + 1) % 3])
        steps = [100 + (2 * (2 * t + k)) % 10 for k in range(2)]
        np.testing.assert_array_equal(element["meta_train"].numpy(),
                                      np.array([steps, [s + 1 for s in steps]]))
        np.testing.assert_array_equal(element["meta_val"].numpy(),
                                      200 + (2 * t) % 10 + np.arange(2))
    # ragged PT batches
    ragged = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1], [2, 3], [4, 5, 6], [7]]))
    it = iter(km.meta_dataset(ragged.batch(2, drop_remainder=True), meta_train, meta_val))
    for t in range(3):
        element = next(it)
        assert element["pt"].to_list() == [[[1], [2, 3]], [[4, 5, 6], [7]]][t % 2]
        assert element["pt_fresh"].to_list() == [[[1], [2, 3]], [[4, 5, 6], [7]]][(t + 1) % 2]


def test_bad_input_is_named():
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=256)
    model = meta_pt_toy.build(0, y.shape[1])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1)
    with pytest.raises(km.InputMismatchError, match="meta_dataset"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(), epochs=1,
                  steps_per_epoch=2, verbose=0)
    with pytest.raises(km.InputMismatchError, match="meta_train must be batched"):
        km.meta_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True),
                        tf.data.Dataset.from_tensor_slices((x_ft, y_ft)).batch(8),
                        tf.data.Dataset.from_tensor_slices((x_ft, y_ft)).batch(8, drop_remainder=True))
    with pytest.raises(km.InputMismatchError, match="encoder 'lazy' is not built"):
        km.MetaPretrainer(keras.Sequential([keras.layers.Dense(2)], name="lazy"), model.pt_head,
                          model.ft_head, TaskWeights(2), pt_loss=None, ft_loss=None)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_non_finite_hypergradient_stops_fit_without_updating_phi(jit_compile):
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=512)
    model = meta_pt_toy.build(0, y.shape[1], warmup_steps=0, jit_compile=jit_compile)
    model.ft_loss_fn = lambda y_true, p: tf.reduce_mean(p) * np.nan  # poisons every hyperstep
    with pytest.raises(km.NonFiniteHypergradientError, match="phi was not updated"):
        model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1, steps_per_epoch=5, verbose=0)
    np.testing.assert_array_equal(model.meta_parameters()[0], 0.0)


def test_default_neumann_alpha_is_the_current_pt_learning_rate_under_a_schedule():
    # Reference: the explicit float64 computation with alpha = schedule(iterations), the PT
    # learning rate at the hyperstep (not its initial value 0.1).
    model = tiny_float64_model(1, 2, alpha=None)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model.compile(pt_optimizer=keras.optimizers.SGD(schedule), jit_compile=False)
    data = tiny_data(1)
    for iterations in (0, 3):
        model.optimizer.iterations.assign(iterations)
        expected, _ = independent_hypergradient(model, data, 1, 2, 0.1 * 0.5 ** iterations)
        assert rel_err(model.hypergradient(data).hypergrad[0], expected) < 1e-5


def test_hyperstep_schedule_on_ints_and_tensors():
    # Reference: the schedule written out by hand: warm-up 4, then every 3rd step.
    schedule = km.HyperstepSchedule(every=3, warmup=4)
    expected = [4, 7, 10, 13]
    assert [s for s in range(15) if schedule.is_hyperstep(s, 4)] == expected
    steps = tf.range(15, dtype=tf.int64)
    mask = schedule.is_hyperstep(steps, tf.constant(4, tf.int64)).numpy()
    assert np.flatnonzero(mask).tolist() == expected
    with pytest.raises(ValueError, match="hyperstep_every"):
        km.HyperstepSchedule(every=0)


def test_default_ft_unroll_continues_the_live_keras_adam():
    # Reference: the explicit float64 computation with the FT unroll written out as Adam
    # (m, v, t continued from the Keras FT optimizer's slots after 3 live FT-head steps).
    model = tiny_float64_model(2, 1, alpha=0.1, ft_unroll_optimizer=None)
    model.compile(ft_optimizer=keras.optimizers.Adam(0.05), jit_compile=False)
    data = tiny_data(2)
    for _ in range(3):
        model._ft_head_step(data["meta_train"])
    ft_vars = model.ft_head.trainable_variables
    opt = model.ft_optimizer
    m = [tf.constant(opt._momentums[opt._get_variable_index(v)].numpy()) for v in ft_vars]
    v = [tf.constant(opt._velocities[opt._get_variable_index(v)].numpy()) for v in ft_vars]
    t0 = int(opt.iterations.numpy())
    assert t0 == 3

    def adam_update(psi, grads, k):
        t = t0 + k + 1
        out = []
        for i, (p, g) in enumerate(zip(psi, grads)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            m_hat, v_hat = m[i] / (1 - 0.9 ** t), v[i] / (1 - 0.999 ** t)
            out.append(p - 0.05 * m_hat / (tf.sqrt(v_hat + 1e-8) + 1e-7))
        return out

    result = model.hypergradient(data)
    expected, psi_k = independent_hypergradient(model, data, 2, 1, 0.1, adam_update)
    assert rel_err(result.hypergrad[0], expected) < 1e-5
    for got, ref in zip(result.params[2], psi_k):  # Keras keeps lr=0.05 as a float32 variable
        np.testing.assert_allclose(got, ref, rtol=1e-7)


def test_pt_curvature_is_the_largest_eigenvalue_of_the_pt_hessian():
    # Reference: numpy.linalg.eigvalsh of the explicit PT Hessian (tf jacobians, float64).
    model = tiny_float64_model(1, 1, alpha=0.1)
    data = tiny_data(1)
    hessian, _ = explicit_pt_hessian(model, data, model.meta_layer.logits)
    eigenvalues = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))
    largest = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert float(model.pt_curvature(data, 300)) == pytest.approx(largest, rel=1e-4)


def test_unsupported_ft_optimizer_is_named_at_compile():
    model = tiny_float64_model(1, 1, alpha=0.1, ft_unroll_optimizer=None)
    with pytest.raises(ValueError, match="RMSprop.*ft_unroll_optimizer"):
        model.compile(ft_optimizer=keras.optimizers.RMSprop(0.01))


def test_inputs_role_hyperstep_matches_explicit_float64_computation():
    # meta_role="inputs" (SimCLR: TwoViews with a learned time warp as phi). Reference: the
    # Hessian of the NT-Xent PT loss over (encoder, projection) and its mixed Jacobian with
    # the warp's weights, formed by tf jacobians through the Keras layers, g_FT through one
    # SGD step written out, and the Neumann series in NumPy.
    from keras_metapt.hyper import LearnedTimeWarp, TwoViews
    from keras_metapt.simclr import simclr_meta_pretrainer
    keras.utils.set_random_seed(4)
    f64 = "float64"
    encoder = keras.Sequential([keras.Input((32, 2), dtype=f64), keras.layers.Flatten(dtype=f64),
                                keras.layers.Dense(3, activation="tanh", dtype=f64)])
    projection = keras.Sequential([keras.Input((3,), dtype=f64), keras.layers.Dense(3, dtype=f64)])
    ft_head = keras.Sequential([keras.Input((3,), dtype=f64), keras.layers.Dense(1, dtype=f64)])
    views = TwoViews(learned=LearnedTimeWarp(grid_size=6, squaring_steps=3, initial_strength=0.3,
                                             smoothing_sigma=1.0, filters=(2,), seed=7, dtype=f64))
    views.build((None, 32, 2))
    last = views.learned.magnitude_net.layers[-1].kernel  # zero at init: move it, so that the
    last.assign(np.random.default_rng(3).normal(size=last.shape))  # network gets a hypergradient
    model = simclr_meta_pretrainer(encoder, projection, views, ft_head,
                                   ft_loss=lambda y, p: 0.5 * tf.reduce_mean((p - y) ** 2),
                                   solve=km.linalg.neumann(2, alpha=0.05),
                                   ft_unroll_optimizer=km.optim.sgd(0.2))
    model.compile(jit_compile=False)
    rng = np.random.default_rng(6)
    x_pt = np.cumsum(rng.normal(size=(6, 32, 2)), axis=1) / 4.0
    data = {"pt": (x_pt,), "pt_fresh": (x_pt,),
            "meta_train": (rng.normal(size=(5, 1, 32, 2)), rng.normal(size=(5, 1, 1))),
            "meta_val": (rng.normal(size=(7, 32, 2)), rng.normal(size=(7, 1)))}
    result = model.hypergradient(data)

    pt_vars = encoder.trainable_variables + projection.trainable_variables
    phi_vars = views.trainable_variables
    state = [tf.constant(v.numpy()) for v in views.non_trainable_variables]  # noise seed
    with tf.GradientTape() as tape:  # g_FT through one SGD step of the FT head
        kernel, bias = [tf.constant(v.numpy()) for v in ft_head.trainable_variables]
        x, y = data["meta_train"][0][:, 0], data["meta_train"][1][:, 0]
        with tf.GradientTape() as inner:
            inner.watch([kernel, bias])
            loss = 0.5 * tf.reduce_mean((tf.matmul(encoder(x), kernel) + bias - y) ** 2)
        kernel, bias = [p - 0.2 * g for p, g in zip([kernel, bias], inner.gradient(loss, [kernel, bias]))]
        x, y = data["meta_val"]
        val = 0.5 * tf.reduce_mean((tf.matmul(encoder(x), kernel) + bias - y) ** 2)
    g_e = np.concatenate([g.numpy().ravel() for g in tape.gradient(val, encoder.trainable_variables)])
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            two = views.stateless_call(phi_vars, state, x_pt, training=True)[0]
            z = projection(encoder(two))
            z1, z2 = tf.split(z, 2)
            loss = km.losses.nt_xent(z1, z2, 0.5)
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, pt_vars)], 0)
    size = int(flat.shape[0])
    hessian = np.concatenate([j.numpy().reshape(size, -1) for j in outer.jacobian(flat, pt_vars)], 1)
    mixed = np.concatenate([j.numpy().reshape(size, -1) for j in outer.jacobian(flat, phi_vars)], 1)
    rhs = np.concatenate([g_e, np.zeros(size - g_e.size)])
    term, total = rhs.copy(), rhs.copy()
    for _ in range(2):
        term = term - 0.05 * hessian @ term
        total += term
    expected = -mixed.T @ (0.05 * total)
    got = np.concatenate([np.ravel(g) for g in result.hypergrad])
    assert np.abs(expected).max() > 1e-6  # the warp's weights do receive a hypergradient
    assert rel_err(got, expected) < 1e-6


def test_hyper_optimizer_parameter_groups_step_each_group_at_its_own_rate():
    # Reference: with SGD, a hyperstep moves each phi variable by -(its group's rate) x the
    # hypergradient that model.hypergradient returns for the same state and data (a
    # hyperstep changes no RNG or BatchNorm state, so both see the same computation).
    from keras_metapt.hyper import LearnedTimeWarp, TwoViews
    from keras_metapt.simclr import simclr_meta_pretrainer
    keras.utils.set_random_seed(4)
    encoder = keras.Sequential([keras.Input((32, 2)), keras.layers.Flatten(),
                                keras.layers.Dense(3, activation="tanh")])
    warp = LearnedTimeWarp(grid_size=6, squaring_steps=3, initial_strength=0.3, filters=(2,), seed=7)
    views = TwoViews(learned=warp)
    views.build((None, 32, 2))
    last = warp.magnitude_net.layers[-1].kernel
    last.assign(np.random.default_rng(0).normal(size=last.shape))
    model = simclr_meta_pretrainer(encoder, keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)]),
                                   views, keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                                   ft_loss=lambda y, p: 0.5 * tf.reduce_mean((p - y) ** 2),
                                   solve=km.linalg.neumann(1, alpha=0.05))
    net_vars = warp.magnitude_net.trainable_variables
    with pytest.raises(ValueError, match="leave out phi variables"):
        model.compile(hyper_optimizer=[(keras.optimizers.SGD(0.1), net_vars)], jit_compile=False)
    with pytest.raises(ValueError, match="give each phi variable one group"):
        model.compile(hyper_optimizer=[(keras.optimizers.SGD(0.1), net_vars),
                                       (keras.optimizers.SGD(3.0), net_vars[:1] + [warp.strength_logit])],
                      jit_compile=False)
    shared = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="repeats an optimizer"):
        model.compile(hyper_optimizer=[(shared, net_vars), (shared, [warp.strength_logit])],
                      jit_compile=False)
    with pytest.raises(ValueError, match="not a trainable variable of the meta layer"):
        model.compile(hyper_optimizer=[(keras.optimizers.SGD(0.1), net_vars + encoder.trainable_variables),
                                       (keras.optimizers.SGD(3.0), [warp.strength_logit])],
                      jit_compile=False)
    model.compile(hyper_optimizer=[(keras.optimizers.SGD(0.1), net_vars),
                                   (keras.optimizers.SGD(3.0), [warp.strength_logit])],
                  jit_compile=False)
    rng = np.random.default_rng(6)
    x_pt = (np.cumsum(rng.normal(size=(6, 32, 2)), axis=1) / 4.0).astype("float32")
    data = tf.nest.map_structure(lambda a: tf.constant(a, tf.float32), {
        "pt": (x_pt,), "pt_fresh": (x_pt,),
        "meta_train": (rng.normal(size=(5, 1, 32, 2)), rng.normal(size=(5, 1, 1))),
        "meta_val": (rng.normal(size=(7, 32, 2)), rng.normal(size=(7, 1)))})
    phi = views.trainable_variables
    grads = [g.numpy() for g in model.hypergradient(data).hypergrad]
    before = [v.numpy().copy() for v in phi]
    model._hyperstep(data)
    for var, grad, old in zip(phi, grads, before):
        rate = 3.0 if var is warp.strength_logit else 0.1
        assert np.abs(grad).max() > 0, var.path
        np.testing.assert_allclose(var.numpy(), old - rate * grad, rtol=1e-5, atol=1e-7)
    keys = [key for key, _ in model.state_variables()]
    assert any(k.startswith("hyper_optimizer_0/") for k in keys)
    assert any(k.startswith("hyper_optimizer_1/") for k in keys)


def test_forward_over_reverse_hyperstep_matches_explicit_float64_computation():
    # Reference: the explicit float64 computation (as for the default reverse-over-reverse mode).
    model = tiny_float64_model(2, 2, alpha=0.1)
    model.hvp_mode = "forward_over_reverse"
    data = tiny_data(2)
    expected, _ = independent_hypergradient(model, data, 2, 2, 0.1)
    result = tf.function(model.hypergradient, jit_compile=True)(
        tf.nest.map_structure(tf.constant, data))
    assert rel_err(result.hypergrad[0], expected) < 1e-5
    with pytest.raises(ValueError, match="hvp_mode"):
        km.PTFT(km.optim.sgd(0.1), hvp_mode="reverse")


# --------------------------------------------------------------------------- first order


def test_first_order_hyperstep_with_sgd_is_one_neumann_term_without_hvp():
    # Reference: the explicit float64 computation with H^-1 ~ lr I (P of plain SGD) and the
    # exact mixed Jacobian; the finite difference (eps = 1e-4 / ||v||) is O(eps^2) from it.
    model = tiny_float64_model(1, 0, None, solve=km.hypergrad.first_order(radius=1e-4),
                               pt_optimizer=keras.optimizers.SGD(0.1))
    data = tiny_data(1)
    expected, _ = independent_hypergradient(model, data, 1, 0, 0.1)
    result = model.hypergradient(data)
    assert np.abs(expected).max() > 1e-6
    assert rel_err(result.hypergrad[0], expected) < 1e-6


def test_first_order_hyperstep_preconditions_with_the_live_pt_adam():
    # Reference: a NumPy transcription of the derivative of one Adam step (the twin's form:
    # theta - lr m_hat / (sqrt(v_hat + eps_root) + eps)) with respect to the gradient, at the
    # PT gradient of the fresh batch and at moments accumulated here from the gradients
    # applied, times [g_FT; 0]; then the exact mixed Jacobian as above.
    lr, b1, b2, eps, eps_root = 0.05, 0.9, 0.999, 1e-7, 1e-8
    model = tiny_float64_model(1, 0, None, solve=km.hypergrad.first_order(radius=1e-4),
                               pt_optimizer=keras.optimizers.Adam(lr, b1, b2, eps))
    pt_vars = model.encoder.trainable_variables + model.pt_head.trainable_variables
    rng = np.random.default_rng(0)
    m = np.zeros(sum(int(np.prod(v.shape)) for v in pt_vars))
    v = np.zeros_like(m)
    for _ in range(3):
        grads = [rng.normal(size=tuple(var.shape)) for var in pt_vars]
        model.optimizer.apply([tf.constant(g) for g in grads], pt_vars)
        flat = np.concatenate([g.ravel() for g in grads])
        m, v = b1 * m + (1 - b1) * flat, b2 * v + (1 - b2) * flat ** 2
    data = tiny_data(1)
    with tf.GradientTape() as tape:
        x, y = data["pt_fresh"]
        preds = model.pt_head(model.encoder(x, training=True), training=True)
        loss = masked_multitask_bce(y, preds, 2.0 * tf.sigmoid(model.meta_layer.logits))
    g = np.concatenate([t.numpy().ravel() for t in tape.gradient(loss, pt_vars)])
    t = 4  # the step the JVP differentiates
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
    m_hat, v_hat = m1 / (1 - b1 ** t), v1 / (1 - b2 ** t)
    root = np.sqrt(v_hat + eps_root)
    jacobian = lr * ((1 - b1) / (1 - b1 ** t) / (root + eps)
                     - m_hat / (root + eps) ** 2 / (2 * root) * 2 * (1 - b2) * g / (1 - b2 ** t))
    expected, _ = independent_hypergradient(model, data, 1, 0, None,
                                            precondition=lambda rhs: jacobian * rhs)
    result = model.hypergradient(data)
    assert rel_err(result.hypergrad[0], expected) < 1e-6


def test_first_order_hyperstep_learns_to_separate_helpful_tasks():
    # Ground truth as in test_learned_weights_separate_helpful_tasks (tasks 0-9 help).
    model, history, helpful = run_toy(0, epochs=12, solve=km.hypergrad.first_order())
    assert history.history["hypersteps"][-1] == 50
    assert roc_auc_score(helpful, model.meta_layer.task_weights()) >= 0.9
    with pytest.raises(ValueError, match="first_order.*PT optimizer"):
        tiny_float64_model(1, 0, None, solve=km.hypergrad.first_order(),
                           pt_optimizer=keras.optimizers.RMSprop(0.1))


# --------------------------------------------------------------------------- mixed precision


@functools.lru_cache(maxsize=None)
def toy_element():
    """One element of the toy's stream, the same for every policy."""
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0)
    keras.utils.set_random_seed(0)  # the shuffles' order
    return next(iter(meta_pt_toy.stream(0, x, y, x_ft, y_ft)))


def toy_hypergradient(policy, ft_loss_factor, outer_loss_scale, pt_loss_factor=1.0,
                      solve=None):
    """The toy's PT/FT hypergradient (one SGD FT step; Neumann 3 terms unless ``solve``)
    under a dtype policy, from the same float32 weights for every policy (same seed), with
    the FT and PT losses multiplied by ``ft_loss_factor`` and ``pt_loss_factor``."""
    data = toy_element()
    model = meta_pt_toy.build(0, data["pt"][1].shape[1], policy=policy)
    problem, params, phi = km.hypergrad.keras_problem(
        model.encoder, model.pt_head, model.ft_head, model.meta_layer,
        lambda *args, **kwargs: pt_loss_factor * model.pt_loss_fn(*args, **kwargs),
        lambda y_true, p: ft_loss_factor * model.ft_loss_fn(y_true, p), "loss", True,
        outer_loss_scale=outer_loss_scale)
    batches = km.hypergrad.FinetuneBatches(
        km.StepBatches(tf.nest.map_structure(lambda t: tf.transpose(t, [1, 0, 2]),
                                             data["meta_train"])), data["meta_val"])
    estimator = km.PTFT(km.optim.sgd(0.05), 1, solve or km.linalg.neumann(3, 0.01),
                        check_finite=False)
    return estimator(problem, params, phi, data["pt_fresh"], batches).hypergrad[0].numpy()


def test_float16_hypergradient_underflows_without_the_outer_loss_scale():
    # Reference: the float32 computation from the same weights. With the FT loss x 0.01 the
    # hypergradient (~3e-8) is below float16's range: every second-order product underflows
    # unless the MetaVal loss is scaled (2^15, the hyperstep's initial scale).
    reference = toy_hypergradient("float32", 0.01, None)
    unscaled = toy_hypergradient("mixed_float16", 0.01, None)
    scaled = toy_hypergradient("mixed_float16", 0.01, 2.0 ** 15)
    bfloat16 = toy_hypergradient("mixed_bfloat16", 0.01, None)
    assert rel_err(unscaled, reference) > 0.5  # measured: all zeros (rel. error 1.0)
    assert rel_err(scaled, reference) < 0.03  # measured: 0.0024
    assert rel_err(bfloat16, reference) < 0.1  # bfloat16's 8-bit mantissa; measured: 0.031
    assert not np.array_equal(bfloat16, reference)  # it did compute in bfloat16


@pytest.mark.parametrize("pt_loss_factor", [1.0, 0.01])
def test_float16_cg_solve_works_at_the_hyperstep_scale(pt_loss_factor):
    # Reference: the float32 computation from the same weights. CG grows v by up to
    # 1/lambda_min (100x more with the PT loss x 0.01); its HVPs and the mixed VJP are taken
    # on v rescaled to the norm of the scaled MetaVal gradient, so float16 neither overflows
    # nor underflows. Measured before that rescaling: non-finite at 2^15 (x 1) and at every
    # scale from 2^5 to 2^20 (x 0.01); after: 0.0022 and 0.0022.
    solve = km.linalg.cg(10)
    reference = toy_hypergradient("float32", 1.0, None, pt_loss_factor, solve)
    scaled = toy_hypergradient("mixed_float16", 1.0, 2.0 ** 15, pt_loss_factor, solve)
    assert rel_err(scaled, reference) < 0.01


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_fit_learns_the_helpful_tasks_with_float32_state(policy):
    # Reference: the synthetic tasks' ground truth (as the float32 test above); measured AUROC
    # on seed 0: float32 0.95, mixed_bfloat16 0.96, mixed_float16 0.945.
    model, history, helpful = run_toy(0, epochs=12, policy=policy)
    assert model.encoder.compute_dtype == policy.split("_")[1]
    for v in model.variables:
        assert v.dtype in ("float32", "int64", "int32", "uint8"), (v.path, v.dtype)
    assert roc_auc_score(helpful, model.meta_layer.task_weights()) >= 0.85
    assert sum(history.history["nonfinite_hypersteps"]) == 0
    float16 = policy == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == float16
    assert isinstance(model.ft_optimizer, keras.optimizers.LossScaleOptimizer) == float16
    keys = [key for key, _ in model.state_variables()]
    assert any(k.endswith("hyper_loss_scale") for k in keys) == float16  # checkpointed
    assert sum("dynamic_scale" in k for k in keys) == (2 if float16 else 0)


def test_float16_overflowing_hypersteps_are_skipped_and_the_scale_halved():
    # Reference: the rule itself. At a scale of 2^60 the scaled MetaVal gradient overflows
    # float16 in the HVP: the hyperstep is skipped (phi untouched, the hyper optimizer does not
    # step), counted as an overflow, not as an error, and the scale halves until it fits.
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=1024)
    model = meta_pt_toy.build(0, y.shape[1], policy="mixed_float16", warmup_steps=0,
                              hyper_loss_scale=2.0 ** 60)
    stream = meta_pt_toy.stream(0, x, y, x_ft, y_ft)
    history = model.fit(stream, epochs=1, steps_per_epoch=3, verbose=0)
    assert history.history["hyperstep_overflows"] == [3.0]
    assert history.history["nonfinite_hypersteps"] == [0.0]
    np.testing.assert_array_equal(model.meta_parameters()[0], 0.0)
    assert int(model.hyper_optimizer.iterations.numpy()) == 0
    assert float(model.hyper_loss_scale.numpy()) == 2.0 ** 57
    history = model.fit(stream, epochs=1, steps_per_epoch=60, verbose=0)
    overflows = int(history.history["hyperstep_overflows"][0])
    assert 0 < overflows < 60 and history.history["nonfinite_hypersteps"] == [0.0]
    assert float(model.hyper_loss_scale.numpy()) == 2.0 ** (57 - overflows)
    assert int(model.hyper_optimizer.iterations.numpy()) == 60 - overflows
    assert np.all(np.isfinite(model.meta_parameters()[0]))
    assert np.any(model.meta_parameters()[0] != 0.0)


def test_float16_hyper_loss_scale_doubles_after_a_run_of_finite_hypersteps(monkeypatch):
    # Reference: the rule (as Keras' LossScaleOptimizer, with a growth period of hypersteps).
    monkeypatch.setattr(km.meta_pretrainer, "HYPER_SCALE_GROWTH_HYPERSTEPS", 3)
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=1024)
    model = meta_pt_toy.build(0, y.shape[1], policy="mixed_float16", warmup_steps=0,
                              hyper_loss_scale=4.0)
    history = model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1, steps_per_epoch=7,
                        verbose=0)
    assert history.history["hyperstep_overflows"] == [0.0]
    assert float(model.hyper_loss_scale.numpy()) == 16.0  # doubled after hypersteps 3 and 6
    assert int(model.finite_hypersteps_in_a_row.numpy()) == 1


def test_float16_non_finite_loss_is_an_error_not_an_overflow():
    # A poisoned FT loss (NaN MetaVal loss) is not an overflow: the first hyperstep counts as
    # non-finite and fit stops, the scale unchanged, phi never updated.
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=512)
    model = meta_pt_toy.build(0, y.shape[1], policy="mixed_float16", warmup_steps=0,
                              hyper_loss_scale=4.0)
    model.ft_loss_fn = lambda y_true, p: tf.reduce_mean(p) * np.nan
    with pytest.raises(km.NonFiniteHypergradientError, match="phi was not updated"):
        model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1, steps_per_epoch=5, verbose=0)
    assert float(model.trackers["hyperstep_overflows"].result()) == 0.0
    assert float(model.trackers["nonfinite_hypersteps"].result()) == 5.0
    np.testing.assert_array_equal(model.meta_parameters()[0], 0.0)


def test_first_order_hyperstep_is_refused_under_a_mixed_policy():
    x, y, *_ = meta_pt_toy.synthetic_tasks(0, n=256)
    with pytest.raises(ValueError, match="finite-difference step"):
        meta_pt_toy.build(0, y.shape[1], policy="mixed_bfloat16",
                          solve=km.hypergrad.first_order())


# --------------------------------------------------------------------------- online PT stage


def test_online_hyperstep_at_gamma_zero_is_the_one_step_term():
    """Reference: the explicit float64 computation with no Neumann term beyond alpha I (the
    one-step term, -M^T alpha [g_FT; 0]): HyperDistill as the PT stage, gamma 0 and no
    references (p_t = c_t = theta = 1), after 3 regular steps that it counts; hypergradient()
    reads its state and counts nothing."""
    online = km.HyperDistill(km.optim.sgd(0.1), 0.0, distill_every=0)
    model = tiny_float64_model(1, 0, None, online=online)
    data = tiny_data(1)
    online.advance(3)
    expected, psi_k = independent_hypergradient(model, data, 1, 0, 0.1)
    result = model.hypergradient(data)
    assert np.abs(expected).max() > 1e-6
    assert rel_err(result.hypergrad[0], expected) < 1e-10
    for got, ref in zip(result.params[2], psi_k):
        np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert int(online.state.step.numpy()) == 3
    with pytest.raises(TypeError, match="HyperDistill"):
        tiny_float64_model(1, 0, None, online=km.linalg.neumann(1))
    with pytest.raises(ValueError, match="leave solve and hvp_mode"):
        tiny_float64_model(1, 0, None, solve=km.linalg.cg(3), online=online)


def test_online_fit_counts_every_pt_step_learns_the_helpful_tasks_and_resumes(tmp_path):
    """Ground truth as in test_learned_weights_separate_helpful_tasks (tasks 0-9 help; measured
    AUROC 0.91 with the anchor moved every 50 steps; 0.14 with the line from the random
    initialisation, see the README); the step count against the PT steps taken, also with
    XLA and 5 steps per execution (the in-graph choice); a run stopped after 2 epochs (with
    hypersteps, references and anchor moves before the stop) and resumed from its
    MetaCheckpoint against the uninterrupted run."""
    def online(every=50):
        return km.HyperDistill(km.optim.sgd(1e-2), 0.99, distill_every=every,
                               reference_steps=10, anchor_every=every)

    model, history, helpful = run_toy(0, epochs=12, online=online())
    assert history.history["hypersteps"][-1] == 50
    assert int(model.online.state.step.numpy()) == 12 * 50 == int(model.meta_step.numpy())
    assert int(model.online.state.references.numpy()) == 12
    assert roc_auc_score(helpful, model.meta_layer.task_weights()) >= 0.85
    keys = [k for k, _ in model.state_variables() if k.startswith("online/")]
    assert any("anchor_params" in k for k in keys) and any("fit_cross" in k for k in keys)

    xla, _, _ = run_toy(2, epochs=2, steps=10, online=online(5), jit_compile=True,
                        steps_per_execution=5, warmup_steps=5)
    assert int(xla.online.state.step.numpy()) == 20 == int(xla.meta_step.numpy())
    # hypersteps from t = 6; references at the first call past each multiple of 5: t = 6
    # (5 was passed in the warm-up), 10, 15, 20
    assert int(xla.online.state.references.numpy()) == 4

    full, _, _ = run_toy(1, epochs=3, steps=20, warmup_steps=10, online=online(10))
    run_toy(1, epochs=2, steps=20, warmup_steps=10, online=online(10),
            callbacks=[MetaCheckpoint(str(tmp_path / "ckpt"))])
    resumed, _, _ = run_toy(1, epochs=3, steps=20, warmup_steps=10, online=online(10),
                            callbacks=[MetaCheckpoint(str(tmp_path / "ckpt"))])
    np.testing.assert_array_equal(resumed.meta_parameters()[0], full.meta_parameters()[0])
    assert int(full.online.state.references.numpy()) == 6  # t = 11 (past 10), 20, .., 60
    for a, b in zip(resumed.online.state.variables, full.online.state.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
