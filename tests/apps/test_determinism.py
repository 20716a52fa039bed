"""A seed fixes a run: each app, run twice on the same tiny preset (in separate output
directories, at the same time, with different Python hash seeds), gives exactly the same
results. The two runs get one intra-op thread each (TF_NUM_INTRAOP_THREADS=1), so that they
share this machine's cores without oversubscribing them.

Reference: the other run. Compared exactly: every number of the per-run results (test
AUROCs, the learned task weights, classes scored) and, for the digits app, the whole
validation-loss history and summary. Left out: wall-clock figures (examples/s, epoch
seconds) and paths, which name the run's own directory.
"""

import csv
import json
import os
import subprocess
import sys

from tests.apps.test_multitask_pt import TINY as MULTITASK_TINY
from tests.apps.test_simclr_augment import TINY as SIMCLR_TINY
from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_RESULTS = {"pt_examples_per_second", "pt_epoch_seconds", "saved_models", "warp_png"}


def run_twice(app, tmp_path, *flags):
    """The app twice, concurrently; returns the two output directories."""
    procs, outs = [], []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        out = tmp_path / name
        cmd = [sys.executable, os.path.join(ROOT, "apps", app), f"--output_dir={out}", *flags]
        if app != "digits_reweighting.py":
            cmd.append(f"--saved_models_dir={out / 'models'}")
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, TF_NUM_INTRAOP_THREADS="1")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, env=env))
        outs.append(out)
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    return outs


def results(out):
    records = {}
    for name in sorted(os.listdir(out / "results")):
        record = json.load(open(out / "results" / name))
        records[name] = {k: v for k, v in record.items() if k not in NOT_RESULTS}
    return records


def test_multitask_app_is_deterministic(tmp_path):
    a, b = run_twice("multitask_pt.py", tmp_path, *MULTITASK_TINY, "--arms=meta")
    ra, rb = results(a), results(b)
    assert list(ra) == ["meta_seed0.json"]
    assert len(ra["meta_seed0.json"]["task_weights"]) > 10
    assert ra == rb


def test_simclr_app_is_deterministic(tmp_path):
    # The SimCLR arm (seeded crops, flips, shuffles, NT-Xent). The meta arm is bit-identical
    # too (with apps.runner.setup's single inter-op thread) but compiles its hyperstep for
    # about a minute per run, which the multitask test's meta arm already covers in kind.
    write_fashion_like(str(tmp_path / "idx"), n_train=96, n_test=40)
    a, b = run_twice("simclr_augment.py", tmp_path, *SIMCLR_TINY, "--arms=simclr",
                     f"--images_dir={tmp_path / 'idx'}", "--modality=image",
                     "--label_fraction=0.34", "--batch_size=32", "--ft_batch_size=8")
    ra, rb = results(a), results(b)
    assert list(ra) == ["simclr_seed0.json"]
    assert ra == rb


def test_digits_app_is_deterministic(tmp_path):
    # EvoGrad: the estimator that draws noise (seeded by --seed and the step)
    a, b = run_twice("digits_reweighting.py", tmp_path, "--num_train=600", "--outer_steps=6",
                     "--checkpoint_every=0", "--noplot", "--estimator=evograd")
    histories = [list(csv.reader(open(out / "history.csv"))) for out in (a, b)]
    assert len(histories[0]) == 7 and histories[0] == histories[1]
    assert json.load(open(a / "summary.json")) == json.load(open(b / "summary.json"))
