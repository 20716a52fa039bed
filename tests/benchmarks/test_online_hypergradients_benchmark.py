"""benchmarks.online_hypergradients: the run flags of each arm and the report's arithmetic.

References: the arms' definitions in the module docstring (equal inner steps, the longer arm
1.2x; truncated5 one update per 5 steps); NumPy and scipy.stats for the paired differences and their t intervals.
(The app it runs is tested end to end in tests/apps/test_digits_reweighting.py.)
"""

import numpy as np
import pytest
from scipy import stats

from benchmarks import online_hypergradients as bench


def test_every_arm_trains_the_inner_steps_it_is_defined_with():
    for arm, (_, inner) in bench.ARMS.items():
        flags = bench.run_flags(arm, 3, 750, 0.99, 100)
        outer = int(next(f for f in flags if f.startswith("--outer_steps="))[14:])
        assert outer * inner == (900 if arm == "one_step_1.2x_steps" else 750)
        assert f"--inner_steps={inner}" in flags and "--seed=3" in flags
    assert bench.ARMS["truncated5"][1] == 5 and bench.ARMS["one_step"][1] == 1
    # the weighting flags reach every arm's run, after its own flags
    flags = bench.run_flags("hyperdistill", 3, 750, 0.99, 100,
                            ["--weighting=mwn", "--hyper_lr=0.001"])
    assert flags[-2:] == ["--weighting=mwn", "--hyper_lr=0.001"]
    assert flags[:-2] == bench.run_flags("hyperdistill", 3, 750, 0.99, 100)


def test_paired_differences_and_intervals_against_scipy():
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3]
    results = {arm: {s: {key: float(rng.uniform()) for key, _, _ in bench.METRICS}
                     | {"seconds_per_outer_step": 0.01 * bench.ARMS[arm][1],
                        "test_accuracy_uniform": 0.9} for s in seeds}
               for arm in bench.ARMS}
    table, paired = bench.tables(results, list(bench.ARMS), seeds)
    for other in ("one_step", "truncated5"):
        for key, _, _ in bench.METRICS:
            d = np.array([results["hyperdistill"][s][key] - results[other][s][key]
                          for s in seeds])
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            got = paired[other][key]
            assert got["mean_difference"] == pytest.approx(d.mean())
            assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert "| truncated5 |" in table and "0.0100 |" in table  # 0.05 s per 5 inner steps
