"""The noisy-labels app end to end on a tiny setting, on IDX files in the real format; its
resumption; its --help.

References: the label noise recomputed from the flags with keras_metapt.data (independent of
the app's bookkeeping); every summary figure recomputed with NumPy from the stored per-seed
records; the MWN weights of the stored curve recomputed from the learned layer (a sigmoid
output lies in (0, 1)); an uninterrupted run for "a resumed arm gives the same result, bit for
bit" (CPU, op determinism).
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from apps import noisy_labels, runner
from keras_metapt.data import corrupt_labels, split_clean_meta
from keras_metapt.data.images import load_idx_dataset
from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"num_train": 60, "num_meta": 20, "num_test": 40, "epochs": 2, "batch_size": 20,
        "width": 4, "mwn_hidden": 8}


def tiny_config(tmp_path, images, **changes):
    values = dict(output_dir=str(tmp_path / "run"), resume=True, strategy="default",
                  devices=None, tpu_address=None, arms=("uniform", "mwn_evograd"), seeds=(0,),
                  baseline="uniform", images_dir=images, noise="uniform", noise_rate=0.4,
                  split_seed=0, network="cnn", lr=0.05, weight_decay=5e-4, meta_lr=1e-3,
                  evograd_copies=2, evograd_sigma=1e-3, evograd_temperature=0.05,
                  neumann_terms=1, xla=False, verbose=0, plot=False, **TINY)
    values.update(changes)
    return noisy_labels.Config(**values)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=50, seed=3)
    return str(path)


def test_app_end_to_end_on_idx_files(tmp_path, images):
    out = tmp_path / "out"
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", "noisy_labels.py"), f"--images_dir={images}",
         f"--output_dir={out}", "--arms=uniform,clean_only,mwn_one_step,mwn_evograd,mwn_implicit",
         "--seeds=0", "--verbose=0", "--noise=flip", *flags],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the data: the app's counts against keras_metapt.data applied to the same files
    (_, y), _ = load_idx_dataset(images)
    meta, rest = split_clean_meta(y, 20, 10, seed=0)
    _, changed = corrupt_labels(y[rest[:60]], 0.4, "flip", 10, seed=1)
    assert f"flip noise, {changed.mean():.1%} of the labels wrong" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    for arm in noisy_labels.ARMS:
        records = [json.load(open(out / "results" / f"{arm}_seed0.json"))]
        values = [r["test_accuracy_final"] for r in records]
        assert summary[arm]["final_mean"] == pytest.approx(np.mean(values))
        assert summary[arm]["final_std"] == pytest.approx(np.std(values))
        for r in records:
            assert len(r["test_accuracy_by_epoch"]) == TINY["epochs"]
            assert r["test_accuracy_final"] == r["test_accuracy_by_epoch"][-1]
            assert 0 <= r["test_accuracy_final"] <= 1 and r["seconds_per_step"] > 0
            assert r["peak_memory_mib"] is not None and "CPU" in r["peak_memory_kind"]
            if arm.startswith("mwn_"):
                curve = np.array(r["weight_curve"])
                assert curve.shape == noisy_labels.WEIGHT_CURVE_LOSSES.shape
                assert np.all((curve > 0) & (curve < 1))
                assert 0 < r["mean_weight_clean"] < 1
        if arm != "uniform":
            base = [summary["uniform"]["per_seed"]["0"]["final"]]
            assert summary[arm]["paired"]["final"]["mean_difference"] == pytest.approx(
                np.mean(np.subtract(values, base)))
    table = (out / "summary.md").read_text()
    assert "test accuracy (last epoch)" in table and "mean weight corrupted" in table
    assert os.path.getsize(out / "noisy_labels.png") > 10_000


def test_an_interrupted_arm_resumes_to_the_same_result(tmp_path, images, monkeypatch, capsys):
    config = tiny_config(tmp_path, images, epochs=3)
    data = noisy_labels.load_data(config)
    runner.seed_everything(0)
    reference = noisy_labels.run_arm(config, data, "mwn_evograd", 0)

    config = tiny_config(tmp_path, images, epochs=3, output_dir=str(tmp_path / "cut"))
    save = tf.train.CheckpointManager.save

    calls = []

    def stop_before_second_save(self, *args, **kwargs):
        # killed after epoch 2 wrote its history, before its checkpoint: the resumed run
        # must drop that history entry and redo the epoch from the epoch-1 checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed before the second epoch's checkpoint")
        return save(self, *args, **kwargs)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", stop_before_second_save)
    runner.seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        noisy_labels.run_arm(config, data, "mwn_evograd", 0)
    monkeypatch.undo()
    runner.seed_everything(0)
    resumed = noisy_labels.run_arm(config, data, "mwn_evograd", 0)
    assert "resumed at epoch 1" in capsys.readouterr().out
    for key in ("test_accuracy_by_epoch", "train_loss_by_epoch", "weight_curve",
                "mean_weight_clean", "mean_weight_corrupted"):
        assert resumed[key] == reference[key], key


def test_arms_of_a_seed_start_from_the_same_weights_and_batches(tmp_path, images):
    """Pairing by seed: the classifier of every arm is drawn after the same seeding, and the
    batch order depends on (seed, epoch) only."""
    config = tiny_config(tmp_path, images)
    weights = {}
    for arm in ("uniform", "mwn_one_step", "mwn_evograd"):
        runner.seed_everything(5)
        trainer = noisy_labels.make_trainer(arm, 5, config)
        weights[arm] = [v.numpy() for v in trainer.model.weights]
    for arm in ("mwn_one_step", "mwn_evograd"):
        for a, b in zip(weights["uniform"], weights[arm]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(noisy_labels.batch_order(5, 3, 60, 20, 3),
                                  noisy_labels.batch_order(5, 3, 60, 20, 3))
    assert not np.array_equal(noisy_labels.batch_order(5, 3, 60, 20, 3),
                              noisy_labels.batch_order(6, 3, 60, 20, 3))
    # a set smaller than an epoch of steps: every pass a fresh permutation of all of it
    order = noisy_labels.batch_order(5, 0, 20, 10, 6)
    passes = order.reshape(3, 20)
    assert all(sorted(p) == list(range(20)) for p in passes)
    assert not np.array_equal(passes[0], passes[1])


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "noisy_labels.py"),
                           "--helpshort"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    for name in [f.name for f in dataclasses.fields(noisy_labels.Config)]:
        flag = f"--{name}" if name not in ("resume", "xla", "plot") else f"--[no]{name}"
        assert flag in proc.stdout, flag
