"""`python -m benchmarks.scaling --quick` stays runnable: it writes its table, and its 1- and
2-replica runs on the same global batches agree (reference: the 1-replica run)."""

import json
import subprocess
import sys

from tests.benchmarks.test_meta_pt_benchmark import ROOT


def test_quick_scaling_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--quick",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "scaling.json"))
    assert [r["schedule"] for r in result["rows"]] == ["regular", "hyper", "mixed"]
    for r in result["rows"]:
        assert r["ms_per_step_1"] > 0 and r["ms_per_step_2"] > 0
        assert abs(r["time_ratio_2_over_1"] - r["ms_per_step_2"] / r["ms_per_step_1"]) < 1e-9
    assert result["phi_max_abs"] > 1e-4  # phi moved
    assert result["phi_max_abs_diff"] < 1e-5 * max(1.0, result["phi_max_abs"] * 100)
    assert "| time 2 / 1 |" in (tmp_path / "scaling.md").read_text()
