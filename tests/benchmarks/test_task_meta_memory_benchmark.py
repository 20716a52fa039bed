"""`python -m benchmarks.task_meta_memory --quick` stays runnable and writes its table.

Reference: the table and JSON hold one row per (method, T) asked for, with the figures the
child processes measured (peak above the resident memory before, positive times)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_task_meta_memory_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.task_meta_memory", "--quick",
                           "--methods=maml,warpgrad", "--steps=2", "--repeats=1",
                           f"--output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "task_meta_memory.json"))["rows"]
    assert [(r["T"], r["method"]) for r in rows] == [(2, "maml"), (2, "warpgrad")]
    assert all(r["peak_mib"] > 0 and r["ms"] > 0 for r in rows)
    table = (tmp_path / "task_meta_memory.md").read_text()
    assert "| maml |" in table and "| warpgrad |" in table and "T=2 MiB" in table
    assert (tmp_path / "task_meta_memory.png").stat().st_size > 5_000
