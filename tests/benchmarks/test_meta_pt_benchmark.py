"""`python -m benchmarks.meta_pt --quick` stays runnable and writes its table."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_meta_pt_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.meta_pt", "--quick",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "meta_pt.json"))["rows"]
    assert [(r["xla"], r["hyperstep"]) for r in rows] == [
        (False, "neumann"), (False, "first_order"), (True, "neumann"), (True, "first_order")]
    for r in rows:
        assert r["plain_pt_step_ms"] > 0 and r["meta_pt_step_ms"] > 0 and r["hyperstep_fn_ms"] > 0
        # the reported ratio is the median of the ratios measured round by round
        assert r["meta_over_plain"] == pytest.approx(np.median(r["meta_over_plain_per_round"]))
    table = (tmp_path / "meta_pt.md").read_text()
    assert "| float32 | XLA | first order (SAMA) |" in table
    # tensors held: each function's peak in MiB, and the table's ratio recomputed from them
    held = json.load(open(tmp_path / "meta_pt.json"))["held_mib"]
    assert set(held) == {"plain", "neumann", "first_order"} and min(held.values()) > 0
    assert (f"| hyperstep, first order (SAMA) | {held['first_order']:.3f} | "
            f"{held['first_order'] / held['plain']:.2f}x |") in table
    # the plot, and --plot_only redraws it from the stored JSON alone
    png = tmp_path / "meta_pt.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.meta_pt", "--plot_only",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.stat().st_size > 10_000


def test_quick_meta_pt_benchmark_under_mixed_precision_policies(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.meta_pt", "--quick",
                           "--dtype_policies=mixed_float16", "--hypersteps=neumann",
                           "--nomemory",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "meta_pt.json"))["rows"]
    assert [(r["policy"], r["xla"]) for r in rows] == [("mixed_float16", False),
                                                       ("mixed_float16", True)]
    assert all(r["meta_pt_step_ms"] > 0 and r["hyperstep_fn_ms"] > 0 for r in rows)
    assert "| mixed_float16 | XLA | Neumann i=1 (exact IFT) |" in (tmp_path / "meta_pt.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.meta_pt", "--quick",
                          "--dtype_policies=float64", f"--output_dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--dtype_policies: give some of" in bad.stderr
