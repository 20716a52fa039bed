"""benchmarks.dehb_parallel: DEHB's fidelity levels and its waiting driver loop on Dask.

References: the levels T / 9, T / 3, T of successive halving with eta 3 (written out); for the
driver, the objective's own returns (each trial's fitness is a known function of its fidelity)
and the requested number of evaluations, with trials longer than the driver's 1 s wait."""

import time

import ConfigSpace as CS
import numpy as np
import pytest

from benchmarks.dehb_parallel import WaitingDEHB, lowest_fidelity


def space():
    cs = CS.ConfigurationSpace(seed=0)
    cs.add([CS.UniformFloatHyperparameter("x", 0.0, 1.0)])
    return cs


def slow_objective(config, fidelity, **kwargs):
    time.sleep(1.2)   # longer than WaitingDEHB's wait, so the wait times out once per trial
    return {"fitness": float(fidelity) / 100.0, "cost": 1.2, "info": {"x": float(config["x"])}}


def test_lowest_fidelity_keeps_the_ninth_level(tmp_path):
    horizon = 2000
    levels = WaitingDEHB(f=slow_objective, cs=space(), min_fidelity=lowest_fidelity(horizon, 9),
                         max_fidelity=horizon, eta=3, n_workers=1,
                         output_path=str(tmp_path)).get_next_iteration(0)[1]
    np.testing.assert_allclose(levels, [horizon / 9, horizon / 3, horizon])
    # the plain minimum loses the lowest level in dehb 0.1.1 (log rounding): why the helper
    plain = WaitingDEHB(f=slow_objective, cs=space(), min_fidelity=horizon / 9,
                        max_fidelity=horizon, eta=3, n_workers=1,
                        output_path=str(tmp_path)).get_next_iteration(0)[1]
    assert len(plain) == 2


def test_waiting_driver_collects_every_trial_on_dask(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None) as client:
        optimizer = WaitingDEHB(f=slow_objective, cs=space(), min_fidelity=lowest_fidelity(9, 9),
                                max_fidelity=9, eta=3, client=client, seed=0,
                                output_path=str(tmp_path))
        assert optimizer._get_worker_count() == 2
        start = time.perf_counter()
        optimizer.run(fevals=4)
        seconds = time.perf_counter() - start
    trials = len(optimizer.history)
    assert trials >= 4   # it stops submitting at 4 and collects what is running
    for _, _, fitness, cost, fidelity, info in optimizer.history:
        assert fitness == pytest.approx(fidelity / 100.0) and cost == 1.2 and 0 <= info["x"] <= 1
    assert seconds < 0.8 * 1.2 * trials   # two at a time, not one after another
