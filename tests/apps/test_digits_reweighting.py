"""The digits demo end to end on a tiny preset, and on two mirrored devices (its resumption,
killed at arbitrary points, is tests/faults/test_kill_and_resume.py's).

References: the run's own uniform-weight baseline (same steps and initialisation) for
"meta-learning helps"; the one-device run for the mirrored one; a NumPy transcription of
the losses (tests/apps/digits_reweighting_inprocess.py).
"""

import csv
import json
import os
import subprocess
import sys

from tests.apps import run_pytest_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_app(out, *flags):
    cmd = [sys.executable, os.path.join(ROOT, "apps", "digits_reweighting.py"),
           f"--output_dir={out}", "--num_train=600", "--log_every=5", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(out):
    with open(os.path.join(out, "history.csv")) as f:
        return [(int(r["outer_step"]), float(r["val_loss_meta"]), float(r["val_loss_uniform"]))
                for r in csv.DictReader(f)]


def test_meta_learned_weights_beat_uniform_and_find_noisy_labels(tmp_path):
    out = str(tmp_path / "run")
    run_app(out, "--outer_steps=40", "--checkpoint_every=0")
    rows = history(out)
    assert [r[0] for r in rows] == list(range(1, 41))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["val_loss_meta"] < summary["val_loss_uniform"]
    assert summary["mean_weight_corrupted"] < summary["mean_weight_clean"]
    assert summary["auroc_weights_vs_clean"] > 0.8
    assert os.path.getsize(os.path.join(out, "reweighting.png")) > 10_000


def test_mirrored_two_devices_reproduce_the_one_device_run(tmp_path):
    """Reference: the same run on one device; unrolled hypergradients summed over 2 replicas
    (shards of 300 examples) must give the same validation-loss history. --weighting=mwn is
    refused there."""
    flags = ["--outer_steps=6", "--checkpoint_every=0", "--noplot", "--estimator=unrolled"]
    one = tmp_path / "one"
    run_app(one, *flags)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "tests.two_cpus", os.path.join(ROOT, "apps", "digits_reweighting.py"),
           f"--output_dir={two}", "--num_train=600", "--log_every=5", *flags,
           "--strategy=mirrored", "--devices=/cpu:0,/cpu:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replicas" in proc.stdout
    h1, h2 = history(one), history(two)
    assert len(h1) == len(h2) == 6
    for a, b in zip(h1, h2):
        assert abs(a[1] - b[1]) <= 2e-5 and a[2] == b[2]
    # the Meta-Weight-Net's normalised loss runs on one replica: refused, naming the count
    proc = subprocess.run(cmd[:-2] + ["--weighting=mwn", f"--output_dir={tmp_path / 'mwn'}",
                                      "--strategy=mirrored", "--devices=/cpu:0,/cpu:1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "--weighting=mwn runs on one replica" in proc.stderr
    assert "got 2 replicas" in proc.stderr


def test_hyperdistill_online_run_fits_its_scale_and_refuses_several_inner_steps(tmp_path):
    """--estimator=hyperdistill: one inner step per outer step, references at steps 10, 20,
    30 (the summary reports them and the fitted scale); the meta-learned run ends below the
    uniform one's validation loss (reference: the run's own uniform baseline)."""
    out = str(tmp_path / "hd")
    run_app(out, "--estimator=hyperdistill", "--inner_steps=1", "--outer_steps=30",
            "--hyperdistill_every=10", "--checkpoint_every=0", "--noplot")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["hyperdistill_references"] == 3 and summary["inner_steps_total"] == 30
    scale = summary["hyperdistill_scale"]
    assert abs(scale) < float("inf") and scale != 1  # fitted (it may be negative)
    assert summary["seconds_per_outer_step"] > 0
    assert summary["val_loss_meta"] < summary["val_loss_uniform"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "digits_reweighting.py"),
                           f"--output_dir={tmp_path / 'bad'}", "--estimator=hyperdistill",
                           "--inner_steps=5"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode != 0 and "--inner_steps=5" in proc.stderr


def test_in_process_checks_of_the_problem():
    """tests/apps/digits_reweighting_inprocess.py in its own process (the app's absl flags
    would clash with other modules' flags here): the inner losses of both weightings and the
    uniform baseline against a NumPy transcription."""
    run_pytest_file("digits_reweighting_inprocess.py", 3, timeout=600)


def test_meta_weight_net_online_runs_find_noisy_labels(tmp_path):
    """--weighting=mwn, one-step and HyperDistill online: the Meta-Weight-Net learns to weigh
    corrupted examples below clean ones and the run ends below the uniform run's validation
    loss (reference: the run's own uniform baseline, same steps and initialisation)."""
    for estimator in ("unrolled", "hyperdistill"):
        out = str(tmp_path / estimator)
        run_app(out, "--weighting=mwn", "--hyper_lr=0.003", f"--estimator={estimator}",
                "--inner_steps=1", "--outer_steps=150", "--hyperdistill_every=50",
                "--checkpoint_every=0", "--noplot")
        summary = json.load(open(os.path.join(out, "summary.json")))
        assert summary["val_loss_meta"] < summary["val_loss_uniform"], (estimator, summary)
        assert summary["auroc_weights_vs_clean"] > 0.9, (estimator, summary)


def test_meta_weight_net_run_resumes_and_logits_runs_ignore_its_settings(tmp_path):
    """Reference: the uninterrupted run. A --weighting=mwn HyperDistill run of 4 outer steps,
    resumed to 8 from its checkpoint (MWN weights, hyper-optimizer, HyperDistill state),
    gives the uninterrupted 8-step run's history and summary; a logits run resumes whatever
    the MWN settings, which it does not read, say."""
    flags = ["--weighting=mwn", "--hyper_lr=0.001", "--estimator=hyperdistill", "--inner_steps=1",
             "--hyperdistill_every=3", "--checkpoint_every=4", "--noplot"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_app(straight, *flags, "--outer_steps=8")
    run_app(resumed, *flags, "--outer_steps=4")
    proc = run_app(resumed, *flags, "--outer_steps=8")
    assert "Resumed from" in proc.stdout
    assert history(resumed) == history(straight)
    summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (straight, resumed)]
    for summary in summaries:
        summary.pop("seconds_per_outer_step")
    assert summaries[0] == summaries[1]
    logits = tmp_path / "logits"
    run_app(logits, "--outer_steps=4", "--checkpoint_every=4", "--noplot")
    proc = run_app(logits, "--outer_steps=5", "--checkpoint_every=4", "--noplot", "--mwn_hidden=7",
                   "--mwn_input=evaluated")
    assert "Resumed from" in proc.stdout
