"""The long-horizon schedules app end to end on a tiny setting, on IDX files in the real format;
its resumption; its --help.

References: the hand-tuned arm's final training run transcribed in NumPy (float64 MLP
784-h-10 with ReLU, softmax cross-entropy, wd/2 ||kernels||^2, v <- gamma v - (1 - gamma) g,
w <- w + lr v, on the documented split and batch order) and its test accuracy; the forward and
reversible arms, two independent estimators of the same hypergradient, ending with the same
schedules; the hyperdistill arm at gamma 0 without references against the greedy arm (the
one-step look-ahead, which HyperDistill then equals); the summary recomputed from the stored
records; an uninterrupted run for "a resumed arm gives the same result".
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_metapt.data.images import load_idx_dataset
from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"num_train": 120, "num_val": 40, "hidden": 8, "batch_size": 16, "inner_steps": 24,
        "blocks": 2, "outer_steps": 2, "greedy_every": 8, "greedy_val_batch": 20}
ARMS = "hand_tuned,greedy,hyperdistill,forward,reversible"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=50, seed=5)
    return str(path)


def run_app(images, out, *extra):
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "lr_schedules.py"),
                           f"--images_dir={images}", f"--output_dir={out}", "--seeds=0",
                           "--verbose=0", *flags, *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def numpy_hand_tuned_accuracy(images, seed, lr, momentum, wd):
    (x, y), (x_test, y_test) = load_idx_dataset(images)
    x, x_test = x.reshape(len(x), -1).astype(np.float64), x_test.reshape(len(x_test), -1)
    order = np.random.default_rng(0).permutation(len(x))  # --split_seed=0
    train = order[TINY["num_val"]:TINY["num_val"] + TINY["num_train"]]
    x_train, y_train = x[train], y[train]
    steps = np.random.default_rng([seed, 0, 0]).integers(
        0, TINY["num_train"], size=(TINY["inner_steps"], TINY["batch_size"]))
    h = TINY["hidden"]
    base = (100_000 * seed) * 10  # evaluation stream 0, index 0; + variable index
    w1 = np.asarray(keras.initializers.GlorotUniform(seed=base + 0)((784, h)), np.float64)
    w2 = np.asarray(keras.initializers.GlorotUniform(seed=base + 2)((h, 10)), np.float64)
    params = [w1, np.zeros(h), w2, np.zeros(10)]
    velocity = [np.zeros_like(p) for p in params]
    for index in steps:
        xb, yb = x_train[index], y_train[index]
        pre = xb @ params[0] + params[1]
        act = np.maximum(pre, 0)
        z = act @ params[2] + params[3]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - np.eye(10)[yb]) / len(yb)
        dpre = (dz @ params[2].T) * (pre > 0)
        grads = [xb.T @ dpre + wd * params[0], dpre.sum(0), act.T @ dz + wd * params[2],
                 dz.sum(0)]
        velocity = [momentum * v - (1 - momentum) * g for v, g in zip(velocity, grads)]
        params = [w + lr * v for w, v in zip(params, velocity)]
    logits = np.maximum(x_test @ params[0] + params[1], 0) @ params[2] + params[3]
    return float(np.mean(np.argmax(logits, 1) == y_test))


def test_app_end_to_end_on_idx_files(tmp_path, images):
    out = tmp_path / "out"
    run_app(images, out, f"--arms={ARMS}", "--hand_lr=0.5", "--hand_wd=1e-3",
            "--hyperdistill_gamma=0", "--hyperdistill_every=0")
    records = {arm: json.load(open(out / "results" / f"{arm}_seed0.json"))
               for arm in ARMS.split(",")}
    # the hand-tuned run against its NumPy transcription
    assert records["hand_tuned"]["test_accuracy_final"] == pytest.approx(
        numpy_hand_tuned_accuracy(images, 0, 0.5, 0.9, 1e-3), abs=1e-9)
    # forward and reversible: the same hypergradients, so the same schedules. At the first
    # outer step gamma = 0.5 is exact for both; once the momenta move, reversible runs with
    # gamma rounded down to a multiple of 2^-16 (1e-3 relative then).
    fwd, rev = records["forward"], records["reversible"]
    for name in ("lr", "momentum", "wd"):
        np.testing.assert_allclose(fwd["history"][0]["hypergrad"][name],
                                   rev["history"][0]["hypergrad"][name], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fwd["history"][1]["hypergrad"][name],
                                   rev["history"][1]["hypergrad"][name], rtol=1e-3, atol=1e-9)
        np.testing.assert_allclose(fwd["schedule"][name], rev["schedule"][name], rtol=1e-3,
                                   atol=1e-9)
    assert len(rev["history"]) == TINY["outer_steps"]
    assert rev["history"][0]["schedule"]["lr"] == [0.05, 0.05]  # --init_lr
    assert len(records["greedy"]["history"]) == TINY["inner_steps"] // TINY["greedy_every"]
    # gamma 0, no references: HyperDistill's point is w_(t-1) (p_t = 1, up to the rounding of
    # w_0 + (w - w_0)) and its scale c_t theta = 1, the one-step hypergradient at every update
    distilled, greedy = records["hyperdistill"], records["greedy"]
    assert distilled["hyperdistill_references"] == 0 and distilled["hyperdistill_scale"] == 1.0
    # its step count: every real step, its own (the first of each chunk) and the advanced ones
    assert distilled["hyperdistill_steps"] == TINY["inner_steps"]
    assert len(distilled["history"]) == len(greedy["history"])
    for ours, theirs in zip(distilled["history"], greedy["history"]):
        for name in ("lr", "momentum", "wd"):
            np.testing.assert_allclose(ours["hypergrad"][name], theirs["hypergrad"][name],
                                       rtol=1e-6, atol=1e-12)
    assert distilled["test_accuracy_final"] == pytest.approx(greedy["test_accuracy_final"],
                                                             abs=1e-9)
    for r in records.values():
        assert 0 <= r["test_accuracy_final"] <= 1 and r["seconds"] > 0
        lows, highs = (0.0, 0.01, 0.0), (2.0, 0.99, 0.005)
        for name, low, high in zip(("lr", "momentum", "wd"), lows, highs):
            assert all(low <= v <= high for v in r["schedule"][name])
    summary = json.load(open(out / "summary.json"))
    for arm, r in records.items():
        assert summary[arm]["final_mean"] == pytest.approx(r["test_accuracy_final"])
        if arm != "hand_tuned":
            assert summary[arm]["paired"]["final"]["mean_difference"] == pytest.approx(
                r["test_accuracy_final"] - records["hand_tuned"]["test_accuracy_final"])
    assert "test accuracy" in (out / "summary.md").read_text()
    assert os.path.getsize(out / "lr_schedules.png") > 10_000


def test_resumed_outer_loop_gives_the_same_result(tmp_path, images):
    out = tmp_path / "out"
    run_app(images, out, "--arms=reversible", "--plot=false")
    whole = json.load(open(out / "results" / "reversible_seed0.json"))
    # rewind the saved state to after the first outer step, drop the result, run again
    state_path = out / "reversible_seed0" / "state.json"
    second = whole["history"][1]
    state = {"step": 1, "schedule": second["schedule"], "velocity": second["velocity"],
             "history": whole["history"][:1], "seconds": whole["history"][0]["seconds"]}
    state_path.write_text(json.dumps(state))
    os.remove(out / "results" / "reversible_seed0.json")
    proc = run_app(images, out, "--arms=reversible", "--plot=false")
    assert "resumed at outer step 1" in proc.stdout
    resumed = json.load(open(out / "results" / "reversible_seed0.json"))
    assert resumed["schedule"] == whole["schedule"]
    assert resumed["test_accuracy_final"] == whole["test_accuracy_final"]


def test_bad_settings_are_named(tmp_path, images):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "lr_schedules.py"),
                           f"--images_dir={images}", f"--output_dir={tmp_path}",
                           "--momentum_range=0,0.9"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--momentum_range" in proc.stderr
