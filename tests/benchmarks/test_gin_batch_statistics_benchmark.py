"""`python -m benchmarks.gin_batch_statistics --quick` stays runnable and reports both arms.

Reference: the arms differ (the embedding difference is positive, as the padding changes the
statistics of the "every slot" arm), and the table's ratios are the ratios of the medians
stored in its JSON."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.benchmarks.test_hvp_modes_benchmark import ROOT


def test_quick_gin_batch_statistics_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gin_batch_statistics", "--quick",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "gin_batch_statistics.json"))
    assert result["atoms"] < result["slots"] and result["embedding_max_difference"] > 1e-4
    median = result["median_seconds"]
    table = (tmp_path / "gin_batch_statistics.md").read_text()
    for name, label in (("gradient", "gradient"), ("hvp", "HVP (reverse over reverse)")):
        ratio = median[f"real atoms/{name}"] / median[f"every slot/{name}"]
        assert f"| {label} | " in table and f"| {ratio:.2f}x |" in table
        assert median[f"real atoms/{name}"] > 0 and median[f"every slot/{name}"] > 0
    for key, seconds in result["seconds"].items():  # the medians of the stored rounds
        assert len(seconds) == result["repeats"]
        assert median[key] == pytest.approx(float(np.median(seconds)), rel=1e-12)
