"""`python -m benchmarks.long_horizon` on a tiny setting stays runnable and writes its table.

References: the budget (every recorded run ends within it); each method's pick is the best of
its full-horizon runs (recomputed from the stored trace); the multi-fidelity methods ran at the
fidelities T u / 9 they were given; the paired differences of the table recomputed from the
stored per-seed test accuracies."""

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


def test_tiny_long_horizon_benchmark(tmp_path, images):
    budget = 3.0
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_horizon", f"--images_dir={images}",
         f"--inner_steps={T}", "--blocks=2", f"--budget_seconds={budget}", "--bench_seeds=0",
         "--num_train=100", "--num_val=40", "--hidden=4", "--batch_size=8", "--greedy_every=6",
         "--greedy_val_batch=10", f"--results_dir={tmp_path}"],
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
