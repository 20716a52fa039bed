"""benchmarks.online_schedules: the app flags of each arm and the report's arithmetic.

References: the arms' definitions in the module docstring (greedy every 20 or 5 steps,
HyperDistill every 20 with gamma 0.9 or 0.99); NumPy and scipy.stats for the paired
differences and their t intervals. (The app it runs, its hyperdistill arm included, is tested
end to end in tests/apps/test_lr_schedules.py.)
"""

import numpy as np
import pytest
from scipy import stats

from benchmarks import online_schedules as bench


def test_each_arm_runs_the_app_arm_and_cadence_it_names():
    expected = {"greedy": ("greedy", "20", None), "greedy_every5": ("greedy", "5", None),
                "hyperdistill_gamma0.9": ("hyperdistill", "20", "0.9"),
                "hyperdistill_gamma0.99": ("hyperdistill", "20", "0.99"),
                "hyperdistill_gamma0.99_median": ("hyperdistill", "20", "0.99")}
    assert set(bench.ARMS) == set(expected)
    for arm, (app_arm, every, gamma) in expected.items():
        flags = bench.run_flags(arm, [0, 3], "/runs", ["--images_dir=/x"])
        assert f"--arms={app_arm}" in flags and "--seeds=0,3" in flags
        assert f"--greedy_every={every}" in flags and "--output_dir=/runs/" + arm in flags
        assert (f"--hyperdistill_gamma={gamma}" in flags) == (gamma is not None)
        assert flags[-1] == "--images_dir=/x"  # extra flags last: they win
        assert ("--hyperdistill_scale_fit=median" in flags) == arm.endswith("median")


def test_paired_differences_and_intervals_against_scipy():
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3]
    records = {arm: {s: {"test_accuracy_final": float(rng.uniform()),
                         "val_accuracy_final": float(rng.uniform()), "seconds": 1.0,
                         "schedule": {"lr": [0.1]}} for s in seeds} for arm in bench.ARMS}
    table, paired = bench.tables(records, list(bench.ARMS), seeds)
    for baseline in bench.BASELINES:
        assert set(paired[baseline]) == {"hyperdistill_gamma0.9", "hyperdistill_gamma0.99",
                                         "hyperdistill_gamma0.99_median"}
        for arm, by_metric in paired[baseline].items():
            for key, _ in bench.METRICS:
                d = np.array([records[arm][s][key] - records[baseline][s][key] for s in seeds])
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                assert by_metric[key]["mean_difference"] == pytest.approx(d.mean())
                assert by_metric[key]["ci95"] == pytest.approx([d.mean() - half,
                                                                d.mean() + half])
    assert "| hyperdistill_gamma0.99 | greedy_every5 |" in table
