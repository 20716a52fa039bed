"""The cross-domain few-shot app end to end on a tiny setting, on IDX files in the real format
(the seen domains) and scikit-learn's bundled digits (the unseen domain); its resumption; its
--help.

References: every summary figure recomputed with NumPy from the stored per-seed records and
their per-episode accuracies; an episode's accuracy is a count of correct queries out of
n_way x n_query; the unseen domain's images recomputed from scikit-learn's 8x8 originals (a
28x28 bilinear resize keeps the mean intensity up to edge effects and the [0, 1] range); an
uninterrupted run for "a resumed arm gives the same result, bit for bit" (CPU, op
determinism).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.apps import run_pytest_file
from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"num_steps": 4, "checkpoint_every": 2, "width": 4, "train_n_way": 2, "k_shot": 1,
        "n_query": 2, "test_n_way": 3, "test_n_query": 2, "test_episodes": 5}
ARMS = ("protonet", "ft_fixed", "ft_evograd", "ft_second_order")
FLAG_NAMES = ("output_dir", "resume", "strategy", "devices", "tpu_address", "arms", "seeds",
              "baseline", "images_dir", "num_steps", "width", "train_n_way", "k_shot",
              "n_query", "lr", "ft_lr", "ft_gamma_init", "ft_beta_init", "evograd_copies",
              "evograd_sigma", "evograd_temperature", "evograd_noise", "test_n_way",
              "test_shots", "test_n_query", "test_episodes", "test_seed", "checkpoint_every",
              "xla", "verbose", "plot")  # the Config's fields (cross_domain_fewshot_inprocess)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion")
    write_fashion_like(str(path), n_train=200, n_test=20, seed=4)
    return str(path)


def test_app_end_to_end(tmp_path, images):
    out = tmp_path / "out"
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", "cross_domain_fewshot.py"),
         f"--images_dir={images}", f"--output_dir={out}", "--arms=" + ",".join(ARMS),
         "--seeds=0,1", "--test_shots=2,1", "--verbose=2", *flags],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clothing (6 classes), footwear_bags (4 classes)" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    queries = TINY["test_n_way"] * TINY["test_n_query"]
    for arm in ARMS:
        records = [json.load(open(out / "results" / f"{arm}_seed{s}.json")) for s in (0, 1)]
        for k in (2, 1):
            per_episode = [np.array(r[f"test_episode_accuracies_{k}shot"]) for r in records]
            for r, values in zip(records, per_episode):
                assert values.shape == (TINY["test_episodes"],)
                # a fraction of correct queries
                np.testing.assert_allclose(values * queries, np.round(values * queries),
                                           atol=1e-9)
                assert r[f"test_accuracy_{k}shot"] == pytest.approx(values.mean())
                assert r[f"test_ci95_{k}shot"] == pytest.approx(
                    1.96 * values.std(ddof=1) / np.sqrt(len(values)))
            seed_means = [v.mean() for v in per_episode]
            assert summary[arm][f"{k}shot_mean"] == pytest.approx(np.mean(seed_means))
            assert summary[arm][f"{k}shot_std"] == pytest.approx(np.std(seed_means))
            if arm != "protonet":
                base = [summary["protonet"]["per_seed"][s][f"{k}shot"] for s in ("0", "1")]
                diffs = np.subtract(seed_means, base)
                paired = summary[arm]["paired"][f"{k}shot"]
                assert paired["mean_difference"] == pytest.approx(diffs.mean())
                half = 12.706204736 * diffs.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 d.o.f.)
                assert paired["ci95"] == pytest.approx([diffs.mean() - half,
                                                        diffs.mean() + half], abs=1e-9)
        for r in records:
            history = r["history"]
            assert history["step"] == [2, 4] and r["seconds_per_step"] > 0
            assert np.all(np.isfinite(history["train_loss"]))
            if arm == "protonet":
                assert "noise_scales" not in r and history["gamma_scale"] == [[], []]
            else:
                gamma = np.concatenate(r["noise_scales"]["gamma"])
                assert gamma.shape == (4 * TINY["width"],) and np.all(gamma > 0)
                fixed = np.log1p(np.exp(0.3))  # softplus(theta_gamma init)
                if arm == "ft_fixed":
                    np.testing.assert_allclose(gamma, fixed, rtol=1e-6)
                else:  # meta-learned: the Adam steps moved every scale
                    assert np.all(np.abs(gamma - fixed) > 1e-4)
    table = (out / "summary.md").read_text()
    assert "3-way 2-shot unseen-domain accuracy" in table and "noise scale gamma" in table
    assert "Paired difference to protonet" in table
    assert os.path.getsize(out / "cross_domain_fewshot.png") > 10_000


def test_in_process_checks_resume_and_pairing():
    """tests/apps/cross_domain_fewshot_inprocess.py in its own process (the app's absl flags
    would clash with other modules' flags here)."""
    run_pytest_file("cross_domain_fewshot_inprocess.py", 4)


def test_a_domain_too_small_for_the_episodes_is_a_usage_error(tmp_path):
    small = tmp_path / "small"
    write_fashion_like(str(small), n_train=30, n_test=5, seed=1)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", "cross_domain_fewshot.py"),
         f"--images_dir={small}", f"--output_dir={tmp_path / 'out'}", "--k_shot=5",
         "--n_query=10", "--seeds=0", "--arms=protonet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "seen domain" in proc.stderr and "Traceback" not in proc.stderr
