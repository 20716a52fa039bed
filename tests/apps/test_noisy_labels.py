"""The noisy-labels app end to end on a tiny setting, on IDX files in the real format; its
resumption; its --help.

References: the label noise recomputed from the flags with keras_metapt.data (independent of
the app's bookkeeping); every summary figure recomputed with NumPy from the stored per-seed
records; the MWN weights of the stored curve recomputed from the learned layer (a sigmoid
output lies in (0, 1)); an uninterrupted run for "a resumed arm gives the same result, bit for
bit" (CPU, op determinism); the one-device run for the data-parallel one (two logical CPUs,
--strategy=mirrored; the MLP has no batch statistics, so the two compute the same losses and
updates up to float32 round-off).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_metapt.data import corrupt_labels, split_clean_meta
from keras_metapt.data.images import load_idx_dataset
from tests.apps import run_pytest_file
from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"num_train": 60, "num_meta": 20, "num_test": 40, "epochs": 2, "batch_size": 20,
        "width": 4, "mwn_hidden": 8}


ARMS = ("uniform", "clean_only", "mwn_one_step", "mwn_evograd", "mwn_implicit",
        "mwn_hyperdistill", "mwn_lookahead5")
FLAG_NAMES = ("output_dir", "resume", "strategy", "devices", "tpu_address", "arms", "seeds",
              "baseline", "images_dir", "noise", "noise_rate", "num_train", "num_meta",
              "num_test", "split_seed", "network", "width", "epochs", "batch_size", "lr",
              "weight_decay", "meta_lr", "mwn_hidden", "evograd_copies", "evograd_sigma",
              "evograd_temperature", "evograd_noise", "mwn_input", "neumann_terms",
              "hyperdistill_gamma", "hyperdistill_every", "hyperdistill_reference_steps",
              "hyperdistill_anchor_every", "xla", "verbose", "plot")


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
         f"--output_dir={out}", f"--arms={','.join(ARMS)}", "--hyperdistill_every=2",
         "--seeds=0", "--verbose=0", "--noise=flip", *flags],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the data: the app's counts against keras_metapt.data applied to the same files
    (_, y), _ = load_idx_dataset(images)
    meta, rest = split_clean_meta(y, 20, 10, seed=0)
    _, changed = corrupt_labels(y[rest[:60]], 0.4, "flip", 10, seed=1)
    assert f"flip noise, {changed.mean():.1%} of the labels wrong" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    for arm in ARMS:
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
                assert curve.shape == (81,)
                assert np.all((curve > 0) & (curve < 1))
                assert 0 < r["mean_weight_clean"] < 1
        if arm != "uniform":
            base = [summary["uniform"]["per_seed"]["0"]["final"]]
            assert summary[arm]["paired"]["final"]["mean_difference"] == pytest.approx(
                np.mean(np.subtract(values, base)))
    table = (out / "summary.md").read_text()
    assert "test accuracy (last epoch)" in table and "mean weight corrupted" in table
    assert os.path.getsize(out / "noisy_labels.png") > 10_000


def test_in_process_checks_resume_and_pairing():
    """tests/apps/noisy_labels_inprocess.py in its own process (the app's absl flags would
    clash with other modules' flags here): an interrupted arm resumes to the uninterrupted
    result; arms of a seed share weights and batches; the config's fields are FLAG_NAMES;
    the EvoGrad settings reach its estimator and only its results config."""
    run_pytest_file("noisy_labels_inprocess.py", 6)


def run_two_replicas(out, images, *flags):
    return subprocess.run(
        [sys.executable, "-m", "tests.two_cpus", os.path.join(ROOT, "apps", "noisy_labels.py"),
         f"--images_dir={images}", f"--output_dir={out}", "--seeds=0", "--verbose=2",
         "--noplot", "--strategy=mirrored", "--devices=/cpu:0,/cpu:1", *flags],
        capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_mirrored_two_devices_reproduce_the_one_device_run(tmp_path, images):
    arms = "--arms=uniform,mwn_evograd"  # every estimator: tests/test_reweighting.py
    flags = [f"--{k}={v}" for k, v in TINY.items()] + [arms, "--weight_decay=0.01"]
    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", "noisy_labels.py"), f"--images_dir={images}",
         f"--output_dir={one}", "--seeds=0", "--verbose=0", "--noplot", *flags],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    proc = run_two_replicas(two, images, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replicas (mirrored)" in proc.stdout
    for arm in ("uniform", "mwn_evograd"):
        a = json.load(open(one / "results" / f"{arm}_seed0.json"))
        b = json.load(open(two / "results" / f"{arm}_seed0.json"))
        np.testing.assert_allclose(b["train_loss_by_epoch"], a["train_loss_by_epoch"],
                                   rtol=1e-4)
        # 40 test images: an accuracy may move by one image at most
        np.testing.assert_allclose(b["test_accuracy_by_epoch"], a["test_accuracy_by_epoch"],
                                   atol=1 / 40 + 1e-9)
        if arm != "uniform":
            np.testing.assert_allclose(b["weight_curve"], a["weight_curve"], atol=2e-3)
    # batch normalisation (the CNN) runs data-parallel too; HyperDistill is refused
    cnn = run_two_replicas(tmp_path / "cnn", images, *flags[:-2], "--arms=mwn_one_step",
                           "--network=cnn", "--epochs=1")
    assert cnn.returncode == 0, cnn.stderr[-3000:]
    record = json.load(open(tmp_path / "cnn" / "results" / "mwn_one_step_seed0.json"))
    assert np.isfinite(record["train_loss_by_epoch"]).all()
    refused = run_two_replicas(tmp_path / "hd", images, "--arms=uniform,mwn_hyperdistill")
    assert refused.returncode != 0 and "mwn_hyperdistill runs on one device" in refused.stderr
    assert "Traceback" not in refused.stderr
