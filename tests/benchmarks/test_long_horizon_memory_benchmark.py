"""`python -m benchmarks.long_horizon_memory --quick` stays runnable and writes its table.

References: Reversible's hypergradient equals Unrolled's on the same configuration (float32, so
to 1e-3 relative; their float64 agreement is tests/hypergrad/test_reversible.py's) and its
reversal is bit exact; the buffer holds at most the bits the formula counts."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_long_horizon_memory_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_horizon_memory", "--quick",
                           "--methods=unrolled,reversible@0.9", "--horizons=3", "--repeats=2",
                           f"--output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "long_horizon_memory.json"))["rows"]
    assert [(r["method"], r["T"]) for r in rows] == [("unrolled", 3), ("reversible@0.9", 3)]
    unrolled, reversible = rows
    a, b = np.array(reversible["hypergrad"]), np.array(unrolled["hypergrad"])
    assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(b))
    assert reversible["exact"] and reversible["buffer_bytes"] == 8
    assert 0 < reversible["bits_per_weight"] <= reversible["formula_bits_per_weight"] + 1
    assert unrolled["tensor_mib"] > 0 and reversible["seconds"] > 0
    # medians of the 2 fresh processes, the runs kept; the profiled peak saw allocations
    for row in rows:
        assert len(row["tensor_mib_runs"]) == 2
        assert row["tensor_mib"] == np.median(row["tensor_mib_runs"])
        assert row["requested_mib"] > 0
    assert "| reversible@0.9 | 3 |" in (tmp_path / "long_horizon_memory.md").read_text()
    assert (tmp_path / "long_horizon_memory.png").stat().st_size > 5_000
