"""`python -m benchmarks.unrolled_memory --quick` stays runnable and writes its table.

Reference: the two backward passes of one configuration give the same hypergradient (norms
compared; their equality to finite differences is tests/hypergrad/test_unrolled.py's)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_unrolled_memory_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.unrolled_memory", "--quick",
                           "--nets=mlp", "--steps=3", "--repeats=1", f"--output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "unrolled_memory.json"))["rows"]
    assert [(r["K"], r["backward"]) for r in rows] == [(3, "reverse"), (3, "mixed")]
    reverse, mixed = rows
    assert mixed["hypergrad_norm"] == pytest.approx(reverse["hypergrad_norm"], rel=1e-4)
    assert reverse["peak_mib"] > 0 and mixed["ms"] > 0
    assert reverse["held_mib"] > 0 and mixed["held_mib"] > 0
    assert "| mlp | 3 |" in (tmp_path / "unrolled_memory.md").read_text()
    assert (tmp_path / "unrolled_memory.png").stat().st_size > 5_000
