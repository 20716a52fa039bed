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
    assert (set(row["peak_mib"]) == set(row["held_mib"]) == {"plain", "evograd", "one_step"})
    assert set(row["ms"]) == {"plain", "evograd", "one_step", "evograd_hyperstep",
                              "one_step_hyperstep"}
    assert all(v > 0 for v in row["held_mib"].values())
    assert all(v > 0 for v in row["ms"].values())
    table = (tmp_path / "evograd_scaling.md").read_text()
    assert "EvoGrad K=2 (gaussian noise)" in table
    assert "`python -m benchmarks.evograd_scaling --quick --noise=gaussian --repeats=2`" in table
    ms, mib = row["ms"], row["peak_mib"]
    assert (f"| {ms['evograd'] / ms['plain']:.2f}x | {ms['evograd'] / ms['one_step']:.2f}x | "
            f"{ms['evograd_hyperstep']:.1f} | {ms['one_step_hyperstep']:.1f} | "
            f"{ms['evograd_hyperstep'] / ms['plain']:.2f}x | "
            f"{ms['evograd_hyperstep'] / ms['one_step_hyperstep']:.2f}x |" in table)
    held = row["held_mib"]
    assert (f"| {mib['one_step']:.0f} | {mib['evograd'] / mib['one_step']:.2f}x | "
            f"{held['plain']:.0f} | "
            f"{held['evograd']:.0f} | {held['one_step']:.0f} | "
            f"{held['evograd'] / held['one_step']:.2f}x |" in table)
    assert (tmp_path / "evograd_scaling.png").stat().st_size > 5_000
