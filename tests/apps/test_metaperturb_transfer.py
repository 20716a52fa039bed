"""The MetaPerturb transfer app end to end on a tiny setting, on IDX files in the real format
(the source tasks) and scikit-learn's bundled digits (the target); reuse of finished results.

References: every summary figure recomputed with NumPy from the stored per-seed records (mean,
population std, paired t intervals); an accuracy is a count of correct images out of the
test set, which is every digit not drawn for training (1,797 - 10 k); the source tasks'
images are disjoint (recomputed from the returned index sets); the learned perturbation's
weights stored with the record are those of its final checkpoint.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("base", "dropout", "finetune", "metaperturb", "metaperturb_one_step",
        "metaperturb_adam_lookahead")
TINY = {"source_steps": 4, "target_steps": 4, "checkpoint_every": 2, "source_train_per_task": 8,
        "source_val_per_task": 4, "source_width": 2, "source_batch": 4, "target_width": 2,
        "target_batch": 10, "target_train_per_class": 2, "test_samples": 2, "eval_batch": 700}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=20, seed=5)
    return str(path)


def run_app(out, images, arms, seeds, *extra):
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", "metaperturb_transfer.py"),
         f"--images_dir={images}", f"--output_dir={out}", "--arms=" + ",".join(arms),
         "--seeds=" + ",".join(map(str, seeds)), "--verbose=2", *flags, *extra],
        capture_output=True, text=True, timeout=900, cwd=ROOT)


def check_record(r, arm, test_size):
    value = r["test_accuracy_digits"]
    assert value * test_size == pytest.approx(round(value * test_size), abs=1e-6)
    assert r["target_history"]["step"] == [2, 4]
    assert np.all(np.isfinite(r["target_history"]["train_loss"]))
    if arm not in ("base", "dropout"):
        assert r["source_history"]["step"] == [2, 4] and r["source_seconds_per_step"] > 0


def test_app_end_to_end_and_reuse(tmp_path, images):
    """Two seeds of base and metaperturb (paired intervals), then every arm on seed 0, which
    reuses the two finished ones."""
    out = tmp_path / "out"
    proc = run_app(out, images, ("base", "metaperturb"), (0, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    test_size = 1797 - 10 * TINY["target_train_per_class"]
    accuracy = {}
    for arm in ("base", "metaperturb"):
        records = [json.load(open(out / "results" / f"{arm}_seed{s}.json")) for s in (0, 1)]
        for r in records:
            check_record(r, arm, test_size)
        accuracy[arm] = [r["test_accuracy_digits"] for r in records]
        assert summary[arm]["digits_mean"] == pytest.approx(np.mean(accuracy[arm]))
        assert summary[arm]["digits_std"] == pytest.approx(np.std(accuracy[arm]))
    diffs = np.subtract(accuracy["metaperturb"], accuracy["base"])
    paired = summary["metaperturb"]["paired"]["digits"]
    half = 12.706204736 * diffs.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 d.o.f.)
    assert paired["mean_difference"] == pytest.approx(diffs.mean())
    assert paired["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half], abs=1e-9)
    meta = json.load(open(out / "results" / "metaperturb_seed0.json"))
    assert sum(np.size(w) for w in meta["perturb_weights"]) == 82
    assert set(meta["perturbation"]) == {"probe_28x28_scale", "probe_28x28_gain",
                                         "probe_7x7_scale", "probe_7x7_gain"}
    assert os.path.getsize(out / "metaperturb_transfer.png") > 0
    assert "digits test accuracy" in open(out / "summary.md").read()
    # every arm on seed 0: the two finished results are reused, the other four run
    again = run_app(out, images, ARMS, (0,), "--noplot")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier") + again.stderr.count("done earlier") == 2
    summary = json.load(open(out / "summary.json"))
    base = json.load(open(out / "results" / "base_seed0.json"))["test_accuracy_digits"]
    for arm in ARMS:
        r = json.load(open(out / "results" / f"{arm}_seed0.json"))
        check_record(r, arm, test_size)
        assert summary[arm]["digits_mean"] == pytest.approx(r["test_accuracy_digits"])
        if arm != "base":
            paired = summary[arm]["paired"]["digits"]
            assert paired["mean_difference"] == pytest.approx(r["test_accuracy_digits"] - base)
            assert paired["ci95"] is None  # one seed: no interval


PROBE = """
import sys, json
import numpy as np
from absl import flags
from apps import metaperturb_transfer as m
flags.FLAGS(["prog"] + json.loads(sys.argv[1]))
config = m.Config.from_flags()
out = {}
for seed in (0, 1):
    d = m.load_data(config, seed)
    out[seed] = {"shapes": [list(x.shape) for x, _ in d.source_train],
                 "label_max": [int(y.max()) for _, y in d.source_train],
                 "indices": [i.tolist() for i in d.source_indices],
                 "target_train": len(d.target_train[0]), "target_test": len(d.target_test[0]),
                 "target_sum": float(d.target_train[0].sum()),
                 "source_sum": float(d.source_train[0][0].sum())}
print(json.dumps(out))
"""


def test_source_tasks_are_disjoint_and_the_target_split_depends_on_the_seed(images):
    args = [f"--images_dir={images}"] + [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for seed in ("0", "1"):
        d = out[seed]
        assert d["shapes"] == [[8, 28, 28, 1]] * 4
        assert [m < 5 for m in d["label_max"]] == [True] * 4  # each task has 5 classes
        used = np.concatenate(d["indices"])
        assert len(np.unique(used)) == len(used) == 4 * 12  # 4 tasks x (8 train + 4 val)
        assert d["target_train"] == 20 and d["target_train"] + d["target_test"] == 1797
    assert out["0"]["indices"] == out["1"]["indices"]  # the source tasks do not depend on it
    assert out["0"]["source_sum"] == out["1"]["source_sum"]
    assert out["0"]["target_sum"] != out["1"]["target_sum"]
