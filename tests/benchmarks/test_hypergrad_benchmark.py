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
    # The CG rows name the iterations they ran: the default stops at non-positive curvature
    # (at most 10), the fixed-count row runs all 10.
    cg = {row["cg_stop_on_negative_curvature"]: row for row in results["timing"]
          if "cg_iterations_run" in row}
    assert 1 <= cg[True]["cg_iterations_run"] <= 10
    assert f"{cg[True]['cg_iterations_run']} of at most 10 iterations run" in cg[True]["estimator"]
    assert cg[False]["cg_iterations_run"] == cg[False]["cg_max_iterations"] == 10
    assert "fixed count: 10 of 10 iterations run" in cg[False]["estimator"]
    assert {(r["mode"], r["T"]) for r in results["memory"]} == {
        ("reverse", 2), ("reverse", 8), ("forward", 2), ("forward", 8)}
    # --quick runs every (mode, T) in one process: resident memory of the first only
    assert results["memory"][0]["peak_mib"] > 0
    assert all(r["peak_mib"] is None for r in results["memory"][1:])
    fixed = {row["call"]: row for row in results["fixed_cost"]}
    assert len(fixed) == 11 and "reverse T=1, one weight" in fixed
    assert ("reverse T=1, the reference problem's 9 argument tensors, losses of one weight"
            in fixed)  # --quick: one hidden layer, 4 weight tensors
    assert all(r["ms_function"] > 0 and r["ms_concrete"] > 0 and r["ms_compiled"] > 0
               for r in fixed.values())
    table = (tmp_path / "hypergrad.md").read_text()
    assert "| reverse | 8 |" in table and "### Fixed cost of a call" in table
    assert (tmp_path / "hypergrad.png").stat().st_size > 10_000


def test_timing_only_skips_the_sweeps_and_tensors_are_counted(tmp_path):
    # Two checks sharing one process (one import of TensorFlow):
    # 1. --timing_only: the timing table itself is stubbed (the quick run above times it);
    #    reference: the stub's rows, and no ridge or memory rows, table or plot panel.
    # 2. The tensor count of the memory table (--quick skips it): a memory child under the
    #    counting (BFC) allocator; reverse mode stores every step, so T=8 holds more than T=2.
    stub = [{"estimator": "one inner gradient (unit)", "ms_graph": 2.0, "ms_xla": 1.0,
             "speedup_xla": 2.0},
            {"estimator": "reverse T=20", "ms_graph": 40.0, "ms_xla": 20.0, "speedup_xla": 2.0,
             "gradients_graph": 20.0}]
    fixed_stub = [{"call": "reverse T=1, one weight", "ms_function": 0.4, "ms_concrete": 0.2,
                   "ms_compiled": 0.1}]
    script = f"""
import sys
from absl import app
import benchmarks.hypergrad as hb

def main(argv):
    hb.timing_table = lambda: {stub!r}
    hb.fixed_cost_table = lambda: {fixed_stub!r}
    hb.ridge_table = hb.memory_table = None  # must not be reached
    hb.main(argv)
    hb.FLAGS.hidden, hb.FLAGS.batch = ["8"], 8
    hb.memory_child("reverse:2,reverse:8")

app.run(main, argv=sys.argv)
"""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    proc = subprocess.run([sys.executable, "-c", script, "--timing_only",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counted = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["mode"], r["T"]) for r in counted] == [("reverse", 2), ("reverse", 8)]
    assert counted[1]["tensor_peak_mib"] > counted[0]["tensor_peak_mib"] > 0
    results = json.load(open(tmp_path / "hypergrad_timing.json"))
    assert results["timing"] == stub and results["ridge"] == [] and results["memory"] == []
    assert results["fixed_cost"] == fixed_stub
    assert results["timing_only"] is True
    table = (tmp_path / "hypergrad_timing.md").read_text()
    assert "| reverse T=20 | 40.00 | 20.00 | 2.00x | 20.0 |" in table
    assert "| reverse T=1, one weight | 0.400 | 0.200 | 0.100 |" in table
    assert "ridge" not in table and "Peak memory" not in table
    assert (tmp_path / "hypergrad_timing.png").stat().st_size > 5_000
    assert not (tmp_path / "hypergrad.json").exists()  # a full run's files stay untouched
