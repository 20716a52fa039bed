"""`python -m benchmarks.paired_runs`: paired differences between arms of two stored runs.

Reference: the mean of the per-seed differences and its 95% Student-t interval written out
with NumPy and scipy.stats.t, over the seeds both runs hold; a bad --run/--pair is named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tests.benchmarks.test_meta_pt_benchmark import ROOT


def write_records(folder, arm, values):
    os.makedirs(folder, exist_ok=True)
    for seed, value in values.items():
        with open(os.path.join(folder, f"{arm}_seed{seed}.json"), "w") as f:
            json.dump({"arm": arm, "seed": seed, "test_auroc_linear": value}, f)


def run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.paired_runs", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_paired_differences_over_the_common_seeds(tmp_path):
    base, variant = tmp_path / "base" / "results", tmp_path / "variant" / "results"
    write_records(base, "simclr", {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.79})
    write_records(variant, "meta", {0: 0.83, 1: 0.82, 2: 0.85, 4: 0.99})  # seed 4: no pair
    out = tmp_path / "paired.md"
    proc = run(f"--run=b={base}:simclr", f"--run=v={variant}:meta", "--pair=v-b",
               "--keys=test_auroc_linear", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = np.array([0.03, 0.0, 0.04])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    row = json.load(open(tmp_path / "paired.json"))["rows"][0]
    assert row["pair"] == "v - b" and row["seeds"] == 3
    assert row["mean_difference"] == pytest.approx(diffs.mean())
    assert row["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    assert list(row["per_seed"]) == ["0", "1", "2"]
    assert f"{diffs.mean():+.4f} [{diffs.mean() - half:+.4f}" in out.read_text()
    bad = run(f"--run=b={base}:simclr", "--pair=v-b")
    assert bad.returncode != 0 and "--pair=v-b" in bad.stderr
    bad = run(f"--run=b={tmp_path / 'nowhere'}:simclr", "--pair=b-b")
    assert bad.returncode != 0 and "no folder" in bad.stderr
