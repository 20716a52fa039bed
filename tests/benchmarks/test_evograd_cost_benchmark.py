"""`python -m benchmarks.evograd_cost --quick` stays runnable and writes its table.

Reference: the "x floor" ratios in the table recomputed from the JSON timings; the weight
count against the MLP's layer sizes (16-32-10: 16*32 + 32 + 32*10 + 10)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_evograd_cost_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.evograd_cost", "--quick",
                           f"--output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.load(open(tmp_path / "evograd_cost.json"))["results"]
    assert entry["mlp"] == "16-32-10" and entry["weights"] == 16 * 32 + 32 + 32 * 10 + 10
    names = ["forward", "gradient (unit)", "floor: 2 forwards + 1 gradient", "noise gaussian",
             "noise rademacher", "EvoGrad gaussian", "EvoGrad gaussian, per-copy draws",
             "EvoGrad rademacher", "EvoGrad rademacher, per-copy draws"]
    table = (tmp_path / "evograd_cost.md").read_text()
    for mode in ("graph", "xla"):
        assert list(entry[mode]) == names and all(v > 0 for v in entry[mode].values())
    for name in names:
        g, x = entry["graph"][name], entry["xla"][name]
        floor_g = entry["graph"]["floor: 2 forwards + 1 gradient"]
        floor_x = entry["xla"]["floor: 2 forwards + 1 gradient"]
        assert (f"| {name} | {g:.2f} | {g / floor_g:.2f}x | {x:.2f} | {x / floor_x:.2f}x |"
                in table)
    assert (tmp_path / "evograd_cost.png").stat().st_size > 5_000
