"""`python -m benchmarks.fewshot_hypergradient_signal` stays runnable on a tiny setting.

Reference: the statistics recomputed from their definitions on the stored counts (a share of
`scales` is a multiple of 1 / scales); the scale count against the encoder (2 x width per
block, 4 blocks)."""

import json
import os
import subprocess
import sys

from tests.data.test_images import write_fashion_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_signal_benchmark(tmp_path):
    images = tmp_path / "fashion"
    write_fashion_like(str(images), n_train=200, n_test=10, seed=2)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fewshot_hypergradient_signal", "--draws=4",
         "--width=3", "--train_n_way=2", "--k_shot=1", "--n_query=2",
         f"--images_dir={images}", f"--results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.load(open(tmp_path / "fewshot_hypergradient_signal.json"))
    assert set(stored["results"]) == {"ft_second_order", "ft_evograd"}
    table = (tmp_path / "fewshot_hypergradient_signal.md").read_text()
    for arm, r in stored["results"].items():
        assert r["draws"] == 4 and r["scales"] == 2 * 3 * 4
        for key in ("fraction_abs_t_above_1.96", "fraction_mean_negative"):
            assert abs(r[key] * 24 - round(r[key] * 24)) < 1e-9
        assert r["median_abs_t"] >= 0
        assert (f"| {arm} | 4 | 24 | {r['fraction_abs_t_above_1.96']:.1%} | "
                f"{r['median_abs_t']:.2f} | {r['fraction_mean_negative']:.1%} |") in table
