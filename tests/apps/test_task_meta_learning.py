"""The task meta-learning app end to end on tiny settings: scikit-learn's bundled digits
(few-shot, every arm), IDX files in the real Fashion-MNIST format (many-shot minibatches) and
the molecule family (RDKit's shipped molecules, GIN learner, query AUROC); its resumption and
repeatability; usage errors (its flags and --help: tests/faults/test_flag_validation.py).

References: every summary figure recomputed with NumPy from the stored per-seed records and
their per-task accuracies; a task's accuracy is a count of correct queries out of
n_way x test_n_query, a task's AUROC one of 2 test_n_query^2 + 1 values (pairs of a
positive and a negative query, ties counting 1/2); an identical second run (--noresume) for
"a seed fixes a run, bit for bit" (CPU, op determinism).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP = os.path.join(ROOT, "apps", "task_meta_learning.py")
TINY = {"meta_steps": 4, "checkpoint_every": 2, "width": 4, "blocks": 1, "n_way": 2,
        "k_shot": 1, "n_query": 2, "inner_steps": 2, "meta_batch": 2, "test_n_query": 2,
        "test_episodes": 3, "test_inner_steps": 2}
ARMS = ("scratch", "pretrain_finetune", "maml", "fomaml", "reptile", "aruba", "cts",
        "warpgrad")


def run_app(out, *extra, timeout=900):
    return subprocess.run([sys.executable, APP, f"--output_dir={out}", "--verbose=2",
                           *[f"--{k}={v}" for k, v in TINY.items()], *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_every_arm_on_digits_with_a_paired_summary_resume_and_repeat(tmp_path):
    out = tmp_path / "out"
    args = ("--family=digits", "--arms=" + ",".join(ARMS), "--seeds=0,1", "--test_shots=2,1")
    proc = run_app(out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meta-test classes" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    queries = TINY["n_way"] * TINY["test_n_query"]
    records = {arm: [json.load(open(out / "results" / f"{arm}_seed{s}.json")) for s in (0, 1)]
               for arm in ARMS}
    for arm in ARMS:
        for k in (2, 1):
            per_task = [np.array(r[f"test_task_accuracies_{k}shot"]) for r in records[arm]]
            for r, values in zip(records[arm], per_task):
                assert values.shape == (TINY["test_episodes"],)
                np.testing.assert_allclose(values * queries, np.round(values * queries),
                                           atol=1e-6)
                assert r[f"test_accuracy_{k}shot"] == pytest.approx(values.mean())
            seed_means = [v.mean() for v in per_task]
            assert summary[arm][f"{k}shot_mean"] == pytest.approx(np.mean(seed_means))
            if arm != "scratch":
                base = [summary["scratch"]["per_seed"][s][f"{k}shot"] for s in ("0", "1")]
                diffs = np.subtract(seed_means, base)
                paired = summary[arm]["paired"][f"{k}shot"]
                assert paired["mean_difference"] == pytest.approx(diffs.mean())
                half = 12.706204736 * diffs.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 d.o.f.)
                assert paired["ci95"] == pytest.approx([diffs.mean() - half,
                                                        diffs.mean() + half], abs=1e-9)
        for r in records[arm]:
            assert r["history"]["step"] == [2, 4] and r["seconds_per_meta_step"] > 0
            metrics = r["history"]["metrics"][-1]
            assert all(np.isfinite(v) for v in metrics.values())
    assert set(records["maml"][0]["history"]["metrics"][0]) == {"query_loss"}
    assert set(records["aruba"][0]["history"]["metrics"][0]) == {
        "support_loss", "distance", "mean_step_size"}
    assert set(records["warpgrad"][0]["history"]["metrics"][0]) == {
        "support_loss", "warp_objective", "distance"}
    low, median, high = records["aruba"][0]["aruba_step_size_quantiles"]
    assert 0 < low <= median <= high
    table = (out / "summary.md").read_text()
    assert "2-way 2-shot meta-test accuracy" in table and "Paired difference to scratch" in table
    assert os.path.getsize(out / "task_meta_learning.png") > 10_000

    again = run_app(out, *args)  # resume: every result reused
    assert again.returncode == 0 and again.stdout.count("done earlier") == 2 * len(ARMS)
    fresh = run_app(tmp_path / "fresh", *args[:1], "--arms=maml,aruba", "--seeds=1",
                    "--test_shots=2,1", "--plot=false")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    for arm in ("maml", "aruba"):
        repeat = json.load(open(tmp_path / "fresh" / "results" / f"{arm}_seed1.json"))
        assert repeat["test_task_accuracies_1shot"] == records[arm][1]["test_task_accuracies_1shot"]
        assert repeat["history"]["metrics"] == records[arm][1]["history"]["metrics"]


def test_many_shot_minibatches_on_idx_files(tmp_path):
    images = tmp_path / "fashion"
    write_fashion_like(str(images), n_train=400, n_test=10, seed=5)
    proc = run_app(tmp_path / "out", f"--images_dir={images}", "--arms=reptile,aruba,cts,warpgrad",
                   "--warpgrad_points=2", "--warpgrad_batch=0", "--query_in_support",
                   "--zero_head", "--warpgrad_init=first_order_maml",
                   "--seeds=0", "--k_shot=12", "--inner_batch=4", "--inner_steps=6",
                   "--test_shots=12", "--test_inner_steps=6", "--blocks=2", "--plot=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.load(open(tmp_path / "out" / "results" / "aruba_seed0.json"))
    assert 0.0 <= record["test_accuracy_12shot"] <= 1.0
    assert record["history"]["metrics"][-1]["distance"] > 0
    assert record["config"]["query_in_support"] is True  # ARUBA trained on support + query
    warpgrad = json.load(open(tmp_path / "out" / "results" / "warpgrad_seed0.json"))
    assert warpgrad["config"]["warpgrad_init"] == "first_order_maml"
    assert np.isfinite(warpgrad["test_accuracy_12shot"])


def test_molecule_family_with_a_gin_learner_scored_by_auroc(tmp_path):
    arms = ("scratch", "pretrain_finetune", "reptile", "warpgrad")
    out = tmp_path / "out"
    proc = run_app(out, "--family=molecules", "--num_molecules=300", "--num_test_tasks=5",
                   "--gin_layers=1", "--gin_hidden=8", "--k_shot=2", "--test_shots=2",
                   "--seeds=0", "--arms=" + ",".join(arms), "--meta_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meta-test tasks: " in proc.stdout and "5 for meta-testing" in proc.stdout
    pairs = TINY["test_n_query"] ** 2
    for arm in arms:
        record = json.load(open(out / "results" / f"{arm}_seed0.json"))
        values = np.array(record["test_task_aurocs_2shot"])
        assert values.shape == (TINY["test_episodes"],)
        assert np.all((values >= 0) & (values <= 1))
        np.testing.assert_allclose(2 * pairs * values, np.round(2 * pairs * values), atol=1e-6)
        assert record["test_auroc_2shot"] == pytest.approx(values.mean())
        assert "rotations" not in record["config"] and record["config"]["gin_hidden"] == 8
    assert "2-way 2-shot meta-test auroc" in (out / "summary.md").read_text()
    assert (out / "cache" / "molecule_task_labels.npz").exists()
    # many-shot: a minibatch of packed graphs per inner step
    many = run_app(tmp_path / "many", "--family=molecules", "--num_molecules=300",
                   "--num_test_tasks=5", "--gin_layers=1", "--gin_hidden=8", "--k_shot=12",
                   "--inner_batch=4", "--test_shots=12", "--seeds=0", "--arms=warpgrad",
                   "--warpgrad_points=1", "--meta_steps=2", "--plot=false")
    assert many.returncode == 0, many.stderr[-3000:]
    record = json.load(open(tmp_path / "many" / "results" / "warpgrad_seed0.json"))
    assert 0 <= record["test_auroc_12shot"] <= 1 and record["config"]["inner_batch"] == 4
    bad = run_app(tmp_path / "bad", "--family=molecules", "--n_way=3", "--seeds=0",
                  "--arms=scratch", timeout=300)
    assert bad.returncode != 0 and "--n_way=2" in bad.stderr and "Traceback" not in bad.stderr


def test_too_many_ways_for_the_split_is_a_usage_error(tmp_path):
    proc = run_app(tmp_path / "out", "--family=digits", "--arms=scratch", "--seeds=0",
                   "--n_way=6", "--num_test_classes=5", timeout=300)
    assert proc.returncode != 0
    assert "--n_way=6" in proc.stderr and "Traceback" not in proc.stderr
    for bad, item in (("reptile:2,maml:0", "'maml:0'"), ("reptile:2,cts:3", "'cts:3'")):
        proc = run_app(tmp_path / "out", "--family=digits", "--arms=scratch,reptile,maml",
                       "--seeds=0", f"--meta_steps_per_arm={bad}", timeout=300)
        assert proc.returncode != 0  # a count < 1; an arm not in --arms
        assert "--meta_steps_per_arm" in proc.stderr and item in proc.stderr
        assert "Traceback" not in proc.stderr


def test_steps_of_one_arm_rerun_that_arm_only(tmp_path):
    """--meta_steps_per_arm: an arm's stored result is reused while its own count is
    unchanged (and a run without the flag reuses it too), rerun when its count changes.
    Reference: the app's "done earlier" log lines and each record's own step history."""
    out, args = tmp_path / "out", ("--family=digits", "--seeds=0", "--test_shots=1")
    first = run_app(out, *args, "--arms=scratch,reptile", "--meta_steps_per_arm=reptile:3")
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.load(open(out / "results" / "reptile_seed0.json"))
    assert record["history"]["step"][-1] == 3 and record["meta_steps"] == 3
    second = run_app(out, *args, "--arms=scratch,reptile", "--meta_steps_per_arm=reptile:2")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "seed 0 scratch: done earlier" in log and "seed 0 reptile: running" in log
    assert json.load(open(out / "results" / "reptile_seed0.json"))["meta_steps"] == 2
    third = run_app(out, *args, "--arms=scratch")  # no flag: scratch's settings unchanged
    assert third.returncode == 0, third.stderr[-3000:]
    assert "seed 0 scratch: done earlier" in third.stdout + third.stderr


DIGEST_PROBE = """
import json, sys
from absl import flags
from apps import runner, task_meta_learning as m
read = []
runner.data_digest = lambda path: read.append(path) or "digest"
flags.FLAGS(["prog"] + sys.argv[1:])
config = m.Config.from_flags()
print(json.dumps({"read": read, "keys": sorted(config.results_config_of("maml")),
                  "warpgrad_keys": sorted(config.results_config_of("warpgrad"))}))
"""


@pytest.mark.parametrize("family", ["molecules", "digits"])
def test_only_the_chosen_family_data_is_digested(tmp_path, family):
    """--images_dir is digested into the results key for the image families only; the
    molecule family's key leaves it out (reference: the paths the digest function was given)."""
    images = tmp_path / "idx"
    images.mkdir()
    proc = subprocess.run([sys.executable, "-c", DIGEST_PROBE, f"--family={family}",
                           "--n_way=2", f"--images_dir={images}"], capture_output=True, text=True,
                          cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if family == "molecules":
        assert out["read"] == [] and "images_dir_sha256" not in out["keys"]
        # the GIN learner's BatchNorm leaves the padding out: results stored before are not
        # taken for the current code's (reference: runner.GIN_RESULTS_ENTRY)
        assert "gin_batch_statistics" in out["keys"]
    else:
        assert set(out["read"]) == {str(images)} and "images_dir_sha256" in out["keys"]
        assert "gin_batch_statistics" not in out["keys"]
    # WarpGrad's, CTS's and ARUBA's own settings are in their arm's key only
    own = {"warp_lr", "warpgrad_init_lr", "warpgrad_points", "warpgrad_batch"}
    others = {"cts_meta_step_size", "cts_update_every", "aruba_zeta", "aruba_power"}
    assert not (own | others) & set(out["keys"])
    assert own <= set(out["warpgrad_keys"]) and not others & set(out["warpgrad_keys"])
    assert set(out["warpgrad_keys"]) - own == set(out["keys"])
