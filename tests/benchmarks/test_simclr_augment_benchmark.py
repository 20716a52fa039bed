"""`python -m benchmarks.simclr_augment --quick` stays runnable on IDX files written in the real
format; its table reports the arms, the cost ratio measured in the same run, and the sweep's
best region computed from the per-seed AUROCs of the same run (reference: the definition,
recomputed here)."""

import json
import subprocess
import sys

import pytest

from tests.benchmarks.test_meta_pt_benchmark import ROOT
from tests.data.test_images import write_fashion_like


def test_quick_simclr_benchmark(tmp_path):
    write_fashion_like(str(tmp_path / "idx"), n_train=128, n_test=40)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.simclr_augment", "--quick",
                           "--seeds=0", "--arms=simclr,fixed_0.1,meta",
                           "--variant_flags=--solver=cg,--solver_iterations=2", f"--images_dir={tmp_path / 'idx'}",
                           f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "out" / "simclr_augment.json"))
    summary = result["summary"]
    assert set(summary) == {"simclr", "fixed_0.1", "meta", "meta_variant"}
    variant = [r for r in result["runs"] if r["arm"] == "meta_variant"]
    assert len(variant) == 1 and variant[0]["config"]["solver"] == "cg"  # its own settings
    assert summary["meta_variant"]["paired"]["linear"]["mean_difference"] == pytest.approx(
        summary["meta_variant"]["linear_mean"] - summary["simclr"]["linear_mean"])
    assert result["meta_cost_ratio"] == pytest.approx(
        summary["simclr"]["pt_examples_per_second"] / summary["meta"]["pt_examples_per_second"])
    table = (tmp_path / "out" / "simclr_augment.md").read_text()
    assert "(c) SimCLR + meta-learned warp" in table and "Cost of meta-PT" in table
    assert "SimCLR + warp at fixed strength 0.1" in table and "best region" in table
    strengths = result["meta_strengths"]["meta"]
    assert len(strengths) == 1 and strengths[0] > 0
    for mode in ("linear", "full"):  # one seed: the region is the best strength alone
        means = {0.0: summary["simclr"][f"{mode}_mean"], 0.1: summary["fixed_0.1"][f"{mode}_mean"]}
        best = max(means, key=means.get)
        sweep = result["sweep"][mode]
        assert sweep["best_strength"] == best and sweep["region"] == [best, best]
        # inside [best, best]; a best at 0 (no warp) extends to half the smallest fixed strength
        limit = best if best > 0 else 0.05
        assert sweep["meta_inside"]["meta"] == int(best <= strengths[0] <= limit)
