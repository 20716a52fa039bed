"""`python -m benchmarks.evograd_agreement` stays runnable on a tiny setting.

Reference: EvoGrad's rate eta = sigma^2 (K - 1) / (K tau) from its definition; each share of
agreeing signs is a multiple of 1 / (3 H + 1), the Meta-Weight-Net's weight count (1-H-1);
cosines in [-1, 1]; the table's rows against the stored figures; the EvoGrad draws, on the
same batches and noise, differ when --mwn_input does. (The live-input weights it
uses: tests/hyper/test_example_weights.py.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tiny(tmp_path, images, *flags):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.evograd_agreement", "--batches=2", "--num_train=60",
         "--num_meta=50", "--batch_size=20", "--width=2", "--mwn_hidden=4",
         "--evograd_sigma=0.01", "--epochs=4", f"--images_dir={images}",
         f"--results_dir={tmp_path}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(tmp_path / "evograd_agreement.json"))


def test_tiny_agreement_benchmark(tmp_path):
    images = tmp_path / "fashion"
    write_fashion_like(str(images), n_train=300, n_test=10, seed=4)
    # the EvoGrad problem follows --mwn_input (the draws and batches are the same for each)
    single = {mwn_input: run_tiny(tmp_path / mwn_input, images, "--copies=2", "--draws=3",
                                  "--states=0", f"--mwn_input={mwn_input}"
                                  )["results"]["0"]["2"]["cosine_single"]
              for mwn_input in ("evaluated", "copies_mean")}
    stored = run_tiny(tmp_path, images, "--copies=2,3", "--draws=3", "--states=0,1",
                      "--mwn_input=current")
    single["current"] = stored["results"]["0"]["2"]["cosine_single"]  # the same draws
    assert len(set(single.values())) == 3, single
    assert stored["copies"] == [2, 3] and stored["states"] == [0, 1]
    table = (tmp_path / "evograd_agreement.md").read_text()
    assert "--mwn_input=current`; network mlp (width 2), seed 0" in table
    weights = 3 * 4 + 1
    for state in ("0", "1"):
        for K in (2, 3):
            r = stored["results"][state][str(K)]
            assert r["eta"] == pytest.approx(0.01 ** 2 * (K - 1) / (K * 0.05))
            # a mean over 2 pairs x 3 draws of multiples of 1 / weights
            assert abs(r["sign_agreement_single"] * weights * 6
                       - round(r["sign_agreement_single"] * weights * 6)) < 1e-6
            for key in ("cosine_single", "cosine_of_mean", "one_step_at_lr_cosine",
                        "cosine_of_mean_with_one_step_at_lr", "live_cosine_single",
                        "live_cosine_of_mean", "live_reference_cosine_with_reference"):
                assert -1 - 1e-9 <= r[key] <= 1 + 1e-9
            assert r["ms_per_call"] > 0 and r["lr"] == pytest.approx(0.05)
            assert (f"| {state} | {r['lr']:g} | {K} | {r['cosine_single']:.3f} | "
                    f"{r['sign_agreement_single']:.3f} | {r['cosine_of_mean']:.3f} | "
                    f"{r['scale_of_mean']:.2f} |") in table
    for K in (2, 3):
        s = stored["summary"][str(K)]
        mean = (stored["results"]["0"][str(K)]["cosine_single"]
                + stored["results"]["1"][str(K)]["cosine_single"]) / 2
        assert s["cosine_single"] == pytest.approx(mean)
        assert f"| {K} | {s['cosine_single']:.3f} |" in table

