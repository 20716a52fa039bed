"""`python -m benchmarks.simclr_augment --quick` stays runnable on IDX files written in the real
format, and its table reports the three arms and the cost ratio measured in the same run."""

import json
import subprocess
import sys

import pytest

from tests.benchmarks.test_meta_pt_benchmark import ROOT
from tests.data.test_images import write_fashion_like


def test_quick_simclr_benchmark(tmp_path):
    write_fashion_like(str(tmp_path / "idx"), n_train=128, n_test=40)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.simclr_augment", "--quick",
                           "--seeds=0", f"--images_dir={tmp_path / 'idx'}",
                           f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "out" / "simclr_augment.json"))
    summary = result["summary"]
    assert set(summary) == {"no_pt", "simclr", "meta"}
    assert result["meta_cost_ratio"] == pytest.approx(
        summary["simclr"]["pt_examples_per_second"] / summary["meta"]["pt_examples_per_second"])
    table = (tmp_path / "out" / "simclr_augment.md").read_text()
    assert "(c) SimCLR + meta-learned warp" in table and "Cost of meta-PT" in table
