"""`python -m benchmarks.long_horizon` on a tiny setting stays runnable and writes its table.

References: the budget (every recorded run ends within it); each method's pick is the best of
its full-horizon runs (recomputed from the stored trace); the multi-fidelity methods ran at the
fidelities T u / 9 they were given; the paired differences of the table recomputed from the
stored per-seed test accuracies. DEHB on a local Dask cluster (--dehb_workers=2): both workers
ran trials, each from its own fresh start, and a trial's validation accuracy equals the same
run (start index, schedule, length) repeated in a separate process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 18


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=40, seed=6)
    return str(path)


def tiny_flags(images):
    return [f"--images_dir={images}", f"--inner_steps={T}", "--blocks=2", "--num_train=100",
            "--num_val=40", "--hidden=4", "--batch_size=8", "--greedy_every=6",
            "--greedy_val_batch=10"]


def test_tiny_long_horizon_benchmark(tmp_path, images):
    budget = 3.0
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_horizon", *tiny_flags(images),
         f"--budget_seconds={budget}", "--bench_seeds=0", f"--results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "long_horizon.json"))["results"]
    fidelities = {T * u // 9 for u in range(1, 10)}
    for seed, rows in results.items():
        for method in ("hypergradient", "random", "dehb", "hyperband"):
            row = rows[method]
            trace = row["trace"]
            assert trace and all(t["seconds"] <= budget for t in trace), method
            full = [t for t in trace if t["steps"] == T]
            assert row["best"]["val_accuracy"] == max(t["val_accuracy"] for t in full)
            assert 0 <= row["test_accuracy_final"] <= 1
            if method in ("dehb", "hyperband"):
                assert {t["steps"] for t in trace} <= fidelities
                assert len({t["steps"] for t in trace}) > 1, method
            else:
                assert {t["steps"] for t in trace} == {T}
        assert rows["hypergradient"]["trace"][0]["schedule"]["lr"] == [0.05, 0.05]
    table = (tmp_path / "long_horizon.md").read_text()
    diff = np.mean([results[s]["dehb"]["test_accuracy_final"]
                    - results[s]["random"]["test_accuracy_final"] for s in results])
    assert "| dehb |" in table and f"{diff:+.4f}" in table
    assert (tmp_path / "long_horizon.png").stat().st_size > 10_000


REPEAT = """
import json, sys
from absl import flags
from apps import lr_schedules as app_module
from benchmarks.long_horizon_trials import training_run
flags.FLAGS(["repeat", *sys.argv[2:]])
config = app_module.Config.from_flags()
exp = app_module.Experiment(config, app_module.load_data(config))
trace = json.load(open(sys.argv[1]))["results"]["0"]["dehb"]["trace"]
print(json.dumps([training_run(exp, 0, t["index"], t["schedule"], t["steps"])
                  for t in trace[:4]]))
"""


def test_dehb_on_a_local_dask_cluster(tmp_path, images):
    budget = 4.0
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_horizon", *tiny_flags(images), "--methods=dehb",
         "--dehb_workers=2", f"--budget_seconds={budget}", "--bench_seeds=0",
         f"--results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEHB on Dask: 2 workers" in proc.stdout
    row = json.load(open(tmp_path / "long_horizon.json"))["results"]["0"]["dehb"]
    trace = row["trace"]
    assert trace and all(t["seconds"] <= budget for t in trace)
    assert len({t["worker"] for t in trace}) == 2
    indices = [t["index"] for t in trace]
    assert len(set(indices)) == len(indices)               # each run its own fresh start
    assert len({t["steps"] for t in trace}) > 1 and {t["steps"] for t in trace} <= {
        T * u // 9 for u in range(1, 10)}
    assert row["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trace
                                               if t["steps"] == T)
    repeat = subprocess.run(
        [sys.executable, "-c", REPEAT, str(tmp_path / "long_horizon.json"), *tiny_flags(images)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    again = json.loads(repeat.stdout.strip().splitlines()[-1])
    assert again == [t["val_accuracy"] for t in trace[:4]]
