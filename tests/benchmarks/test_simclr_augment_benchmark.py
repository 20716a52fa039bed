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
                           "--seeds=0", "--arms=simclr,fixed_0.1,meta,meta_online",
                           "--variant_flags=--solver=cg,--solver_iterations=2",
                           # two references and an anchor move in meta_online's 8 PT steps
                           "--app_flags=--hyperdistill_every=3,--hyperdistill_reference_steps=2,"
                           "--hyperdistill_anchor_every=3", f"--images_dir={tmp_path / 'idx'}",
                           f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "out" / "simclr_augment.json"))
    summary = result["summary"]
    assert set(summary) == {"simclr", "fixed_0.1", "meta", "meta_online", "meta_variant"}
    variant = [r for r in result["runs"] if r["arm"] == "meta_variant"]
    assert len(variant) == 1 and variant[0]["config"]["solver"] == "cg"  # its own settings
    assert summary["meta_variant"]["paired"]["linear"]["mean_difference"] == pytest.approx(
        summary["meta_variant"]["linear_mean"] - summary["simclr"]["linear_mean"])
    assert result["meta_cost_ratio"] == pytest.approx(
        summary["simclr"]["pt_examples_per_second"] / summary["meta"]["pt_examples_per_second"])
    assert result["meta_online_cost_ratio"] == pytest.approx(
        summary["simclr"]["pt_examples_per_second"]
        / summary["meta_online"]["pt_examples_per_second"])
    table = (tmp_path / "out" / "simclr_augment.md").read_text()
    assert "(c) SimCLR + meta-learned warp" in table and "Cost of meta-PT" in table
    assert "SimCLR + warp at fixed strength 0.1" in table and "best region" in table
    assert "(c-online) meta-learned warp, HyperDistill's online PT stage" in table
    assert f"with the online PT stage: {result['meta_online_cost_ratio']:.2f}x" in table
    assert len(result["meta_strengths"]["meta_online"]) == 1
    # a second reference of the same compiled hyperstep failed ("AlreadyExists ... tmp_var")
    # before HyperDistill kept its reference loop functional
    online = [r for r in result["runs"] if r["arm"] == "meta_online"][0]
    assert online["hyperdistill_references"] == 2 and online["hyperdistill_steps"] == 8
    assert abs(online["warp_strength"] - online["warp_strength_by_epoch"][0]) > 1e-5
    assert online["warp_png"].endswith(
        "warp_image_meta_online_seed0.png")
    for run in result["runs"]:  # every arm's MetaVal probe, and the table's means of them
        assert run["meta_val_probe_loss"] > 0 and 0 <= run["meta_val_probe_auroc"] <= 1
        probe = result["meta_val_probe"][run["arm"]]  # one seed: the mean is the run's value
        assert probe["loss"]["mean"] == pytest.approx(run["meta_val_probe_loss"])
    assert f"| {result['meta_val_probe']['simclr']['loss']['mean']:.4f} +- 0.0000 |" in table
    assert all(entry["loss"]["seeds"] == 1 for entry in result["meta_val_probe"].values())
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
