"""The HVP-mode benchmark stays runnable (`python -m benchmarks.hvp_modes --quick`) and reports
every configuration with positive timings. Its correctness counterpart (both modes give the
same hypergradient) is tests/test_meta_pretrainer.py's explicit float64 reference."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_benchmark_runs_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hvp_modes", "--quick",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "hvp_modes.json"))["rows"]
    assert {(r["compilation"], r["hvp_mode"], r["neumann_terms"]) for r in rows} == {
        (c, m, i) for c in ("tf.function", "XLA")
        for m in ("reverse_over_reverse", "forward_over_reverse") for i in (1, 5)}
    assert all(r["hypergradient_ms"] > 0 and r["pt_gradient_ms"] > 0 for r in rows)
    assert "| XLA | forward_over_reverse | 5 |" in (tmp_path / "hvp_modes.md").read_text()
