"""`python -m benchmarks.task_meta_learning --quick`: equal meta-training wall-clock.

References: each arm's meta-steps recomputed from the calibration run's stored records
(median seconds per meta-step over the chunks after the first; max(1, round(budget /
cost)); scratch 1); the meta-steps each run really took read from its own history; the
accuracies from the per-seed records; every paired interval recomputed with NumPy and
scipy's Student t quantile from those records."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("scratch", "reptile", "warpgrad")
BUDGET = 0.3


def t_interval(diffs):
    diffs = np.asarray(diffs, float)
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return diffs.mean(), diffs.mean() - half, diffs.mean() + half


def test_quick_benchmark_gives_each_arm_the_calibrated_steps(tmp_path):
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.task_meta_learning", "--quick",
         f"--arms={','.join(ARMS[1:])}", f"--budget_seconds={BUDGET}",
         f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elapsed = time.perf_counter() - began
    stem = "task_meta_learning_few_shot_quick"
    payload = json.load(open(tmp_path / f"{stem}.json"))
    runs = tmp_path / "task_meta_learning_equal_time" / stem
    for arm in ARMS:
        calibration = json.load(open(runs / "calibration" / "results" / f"{arm}_seed0.json"))
        seconds = calibration["history"]["seconds_per_step"]
        cost = np.median(seconds[1:])
        assert payload["calibration_seconds"][arm] == pytest.approx(cost)
        expected = 1 if arm == "scratch" else max(1, int(round(BUDGET / cost)))
        assert payload["meta_steps"][arm] == expected
        for seed in (0, 1):
            record = json.load(open(runs / "runs" / "results" / f"{arm}_seed{seed}.json"))
            assert record["meta_steps"] == expected
            assert record["history"]["step"][-1] == expected
            # bounded by the whole benchmark's wall-clock; tracing timed apart, once
            assert 0 < record["meta_training_seconds"] < elapsed
            assert len(record["history"]["tracing_seconds"]) == 1
            assert payload["per_seed"][arm][str(seed)]["1shot"] == pytest.approx(
                record["test_accuracy_1shot"])
            assert record["config"]["meta_steps"] == expected  # the arm's own count
            assert "meta_steps_per_arm" not in record["config"]
    per_seed = payload["per_seed"]
    diffs = [per_seed["warpgrad"][s]["1shot"] - per_seed["reptile"][s]["1shot"]
             for s in ("0", "1")]
    claim = payload["claims"]["warpgrad-reptile"]["1shot"]
    mean, low, high = t_interval(diffs)
    assert claim["mean_difference"] == pytest.approx(mean)
    assert claim["ci95"] == pytest.approx([low, high])
    assert "warpgrad-fomaml" not in payload["claims"]  # fomaml was not run
    assert payload["command"] == ("python -m benchmarks.task_meta_learning --setting=few_shot "
                                  f"--quick --arms=reptile,warpgrad --budget_seconds={BUDGET}")
    table = (tmp_path / f"{stem}.md").read_text()
    assert "| warpgrad - reptile |" in table and "| reptile | " in table
    assert (tmp_path / f"{stem}.png").stat().st_size > 5_000


def test_flags_the_benchmark_sets_are_refused_in_app_flags(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.task_meta_learning", "--quick",
         "--app_flags=--width=4 --seeds=3", f"--output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--seeds=3 is set by the benchmark" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_molecule_family_is_reported_as_auroc():
    """Reference: the app's metric per family (query AUROC for molecules, accuracy else),
    the last --family flag winning as in absl. In its own process: the benchmark module
    defines absl flags that other benchmark modules define too."""
    code = ("from benchmarks.task_meta_learning import SETTINGS, metric_name as m; "
            "f = SETTINGS['molecules']['flags']; "
            "print(m(f), m(SETTINGS['few_shot']['flags']), m(f + ['--family=digits']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["AUROC", "accuracy", "accuracy"]
