"""benchmarks.online_meta_pt: the PT stage of each arm and the report's arithmetic.

References: the arms' definitions in the module docstring; NumPy and scipy.stats for the
paired differences and their t intervals. (MetaPretrainer with an online PT stage is tested
against explicit float64 derivatives in tests/test_meta_pretrainer.py.)
"""

import numpy as np
import pytest
from scipy import stats

import keras_metapt as km
from benchmarks import online_meta_pt as bench


def test_each_arm_has_the_pt_stage_it_names():
    assert bench.online_stage("neumann") is None
    one_step = bench.online_stage("one_step")
    assert isinstance(one_step, km.HyperDistill) and one_step.gamma == 0.0
    assert one_step.distill_every == 0
    for arm, anchor in (("hyperdistill", 50), ("hyperdistill_from_w0", None)):
        stage = bench.online_stage(arm)
        assert (stage.gamma, stage.distill_every, stage.reference_steps) == (0.99, 50, 10)
        assert stage.anchor_every == anchor


def test_paired_differences_and_intervals_against_scipy():
    rng = np.random.default_rng(1)
    seeds = [0, 1, 2, 3, 4]
    results = {arm: {s: {"auroc": float(rng.uniform()), "seconds_per_epoch": 1.0}
                     for s in seeds} for arm in bench.ARMS}
    table, paired = bench.report(results, seeds)
    for baseline in bench.BASELINES:
        for arm in bench.ARMS:
            if arm == baseline:
                continue
            d = np.array([results[arm][s]["auroc"] - results[baseline][s]["auroc"]
                          for s in seeds])
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            got = paired[baseline][arm]
            assert got["mean_difference"] == pytest.approx(d.mean())
            assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert "| hyperdistill_from_w0 | neumann |" in table
