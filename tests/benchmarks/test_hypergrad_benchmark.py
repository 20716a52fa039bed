"""The benchmark stays runnable (`python -m benchmarks.hypergrad --quick`) and reports sane figures.

Reference for the accuracy figures: the closed-form ridge hypergradient the benchmark
compares against; CG and the dense solve must reach it on these small sizes.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_benchmark_runs_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hypergrad", "--quick",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "hypergrad.json"))
    for row in results["ridge"]:
        if row["estimator"].startswith(("CG", "exact")):
            assert row["relative_error"] < 1e-8, row
    names = [row["estimator"] for row in results["timing"]]
    assert any(n.startswith("reverse") for n in names) and any(n.startswith("EvoGrad") for n in names)
    assert all(row["ms_graph"] > 0 and row["ms_xla"] > 0 for row in results["timing"])
    assert {(r["mode"], r["T"]) for r in results["memory"]} == {
        ("reverse", 2), ("reverse", 8), ("forward", 2), ("forward", 8)}
    table = (tmp_path / "hypergrad.md").read_text()
    assert "| reverse | 8 |" in table
    assert (tmp_path / "hypergrad.png").stat().st_size > 10_000
