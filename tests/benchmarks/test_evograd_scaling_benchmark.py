"""`python -m benchmarks.evograd_scaling --quick` stays runnable and writes its table.

Reference: the ratios in the table recomputed from the JSON rows; the trainable weight count
against the network built here (keras_metapt.nets.image_classifier at the quick width)."""

import json
import os
import subprocess
import sys

from keras_metapt import nets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_evograd_scaling_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.evograd_scaling", "--quick",
                           "--nets=mlp", "--repeats=2", "--noise=gaussian",
                           f"--output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.load(open(tmp_path / "evograd_scaling.json"))
    (row,) = stored["rows"]
    assert stored["noise"] == "gaussian"
    model = nets.image_classifier("mlp", width=2)
    assert row["params"] == sum(int(v.numpy().size) for v in model.trainable_variables)
    methods = {"plain", "evograd", "evograd_current", "evograd_copies_mean", "one_step"}
    assert set(row["peak_mib"]) == set(row["held_mib"]) == methods
    assert set(row["ms"]) == methods | {f"{m}_hyperstep" for m in methods - {"plain"}}
    assert all(v > 0 for v in row["held_mib"].values())
    assert all(v > 0 for v in row["ms"].values())
    table = (tmp_path / "evograd_scaling.md").read_text()
    assert "EvoGrad K=2 (gaussian noise)" in table
    assert "`python -m benchmarks.evograd_scaling --quick --noise=gaussian --repeats=2`" in table
    ms, mib, held = row["ms"], row["peak_mib"], row["held_mib"]
    m = "evograd_copies_mean"
    assert (f"| EvoGrad, copies' mean losses | {ms[m]:.1f} | "
            f"{ms[m] / ms['plain']:.2f}x | {ms[m] / ms['one_step']:.2f}x | "
            f"{ms[m + '_hyperstep']:.1f} | {ms[m + '_hyperstep'] / ms['plain']:.2f}x | "
            f"{ms[m + '_hyperstep'] / ms['one_step_hyperstep']:.2f}x | {mib[m]:.0f} | "
            f"{mib[m] / mib['one_step']:.2f}x | {held[m]:.0f} | "
            f"{held[m] / held['one_step']:.2f}x |") in table
    assert "| plain SGD | " in table and "| - | - | - |" in table
    assert (tmp_path / "evograd_scaling.png").stat().st_size > 5_000
