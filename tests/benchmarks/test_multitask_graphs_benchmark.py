"""benchmarks.multitask_graphs: the meta-arm diagnostics table from per-seed records.

Reference: the mean and 95% Student-t interval computed here with scipy.stats.
"""

import json

import numpy as np
import pytest
from absl import app
from scipy import stats

from benchmarks.multitask_graphs import meta_diagnostics


def test_meta_diagnostics_rows_hold_means_and_t_intervals():
    aurocs = [0.61, 0.55, 0.70, 0.64, 0.58]
    records = [{"task_weight_auroc_real": a, "task_weight_moved_auroc_real": 0.8,
                "hypergradient_agreement": {"mean_cosine": 0.1 * i, "same_sign_share": 0.2,
                                            "mean_centred_cosine": 0.05},
                "task_weight_history": [{"quantiles": {"10": 0.9, "50": 1.0, "90": 1.1 + i}}],
                "mean_task_weight": {"morgan real": 1.0 + 0.01 * i, "morgan permuted": 0.99}}
               for i, a in enumerate(aurocs)]
    table = meta_diagnostics(records)
    half = stats.t.ppf(0.975, 4) * np.std(aurocs, ddof=1) / np.sqrt(5)
    mean = np.mean(aurocs)
    assert f"| {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] |" in table
    assert "| final weights 10% / 50% / 90% quantile (mean) | 0.900 / 1.000 / 3.100 |" in table
    assert "| mean weight, morgan permuted tasks | 0.990 [0.990, 0.990] |" in table
    assert "hypergradient cosine between batches | 0.200 [" in table
    assert "t test" not in table  # records without the per-task t tests: no such rows
    for i, record in enumerate(records):
        record["hypergradient_agreement"].update(
            real_significant_share=0.3, permuted_significant_share=0.05 + 0.01 * i,
            expected_direction_auroc_real=0.5, expected_size_auroc_real=0.8)
        if i < 2:  # only some seeds have it: the row says over how many
            record["hypergradient_agreement"]["real_significant_raised_share"] = 0.6
    table = meta_diagnostics(records)
    shares = 0.05 + 0.01 * np.arange(5)
    half = stats.t.ppf(0.975, 4) * np.std(shares, ddof=1) / np.sqrt(5)
    assert (f"| share of permuted tasks whose expected hypergradient is not 0 (t test, 5%) | "
            f"{shares.mean():.3f} [{shares.mean() - half:.3f}, {shares.mean() + half:.3f}] |"
            ) in table
    assert "expected hypergradient is not 0 (t test, 5%) | 0.300 [0.300, 0.300] |" in table
    assert "(mean < 0) (2 of 5 seeds) | 0.600 [0.600, 0.600] |" in table
    assert "the way -mean points" not in table  # no seed has it: no row


def test_online_against_implicit_is_the_paired_difference_with_a_t_interval():
    """meta_online - meta per mode, paired by seed; reference: scipy's one-sample t interval
    of the per-seed differences."""
    from benchmarks.multitask_graphs import online_against_implicit
    meta = {"0": {"full": 0.80, "linear": 0.70}, "1": {"full": 0.82, "linear": 0.75},
            "2": {"full": 0.79, "linear": 0.72}}
    online = {"0": {"full": 0.81, "linear": 0.69}, "1": {"full": 0.85, "linear": 0.74},
              "2": {"full": 0.80, "linear": 0.73}}
    row = online_against_implicit({"meta": {"per_seed": meta}, "meta_online": {"per_seed": online}})
    cells = []
    for mode in ("full", "linear"):
        diffs = np.array([online[s][mode] - meta[s][mode] for s in "012"])
        low, high = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
        cells.append(f"{diffs.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
    assert row.splitlines()[-1] == f"| mean [95% t interval] | {cells[0]} | {cells[1]} |"


def test_diagnose_writes_the_tables_of_the_meta_arms_of_a_run_directory(tmp_path):
    """--diagnose: the meta arm's table from its per-seed records (reference: the same
    records through meta_diagnostics), seeds in order; a directory without them is refused."""
    from benchmarks.multitask_graphs import diagnose
    (tmp_path / "results").mkdir()
    records = [{"seed": seed, "task_weight_auroc_real": 0.5 + 0.01 * seed,
                "task_weight_moved_auroc_real": 0.8,
                "task_weight_history": [{"quantiles": {"10": 0.9, "50": 1.0, "90": 1.1}}],
                "mean_task_weight": {"morgan real": 1.0}} for seed in (11, 2, 0)]
    for record in records:
        (tmp_path / "results" / f"meta_seed{record['seed']}.json").write_text(json.dumps(record))
    (tmp_path / "results" / "uniform_seed0.json").write_text("{}")
    report = diagnose(str(tmp_path))
    ordered = sorted(records, key=lambda r: r["seed"])
    assert report == "Seeds 0,2,11.\n\n" + meta_diagnostics(ordered, "meta")
    assert (tmp_path / "diagnostics.md").read_text() == report
    # both meta arms: one table each, a meta_online record never taken for meta
    online = dict(records[0], seed=0)
    (tmp_path / "results" / "meta_online_seed0.json").write_text(json.dumps(online))
    report = diagnose(str(tmp_path))
    assert report == ("Seeds 0,2,11.\n\n" + meta_diagnostics(ordered, "meta") + "\n"
                      + "Seeds 0.\n\n" + meta_diagnostics([online], "meta_online"))
    # refused, naming what: no records, records of different settings, an unreadable record
    (tmp_path / "no_meta" / "results").mkdir(parents=True)
    (tmp_path / "no_meta" / "results" / "uniform_seed0.json").write_text("{}")
    for path in (tmp_path / "no_meta", tmp_path / "missing"):
        with pytest.raises(app.UsageError, match="no meta arm records"):
            diagnose(str(path))
    (tmp_path / "results" / "meta_seed5.json").write_text(json.dumps(
        dict(records[0], seed=5, config_sha256="other")))
    with pytest.raises(app.UsageError, match="2 different settings"):
        diagnose(str(tmp_path))
    (tmp_path / "results" / "meta_seed5.json").write_text("{not json")
    with pytest.raises(app.UsageError, match="cannot read .*meta_seed5.json"):
        diagnose(str(tmp_path))


def test_task_t_plot_pools_every_task_of_every_seed_in_task_order(tmp_path):
    """task_t_points against the records written by hand (t follows the task order of
    task_weights; a task is real unless listed as permuted); --diagnose draws the plot when
    every record holds the per-task t."""
    from benchmarks.multitask_graphs import diagnose, task_t_points
    records = [{"seed": seed, "task_weights": {"b": 1.2 + seed, "a": 0.7, "c": 1.0},
                "permuted_tasks": ["a"], "task_weight_auroc_real": 0.5,
                "task_weight_moved_auroc_real": 0.5,
                "hypergradient_agreement": {"batches": 8, "task_t": [-3.0 - seed, 2.5, 0.1]},
                "task_weight_history": [{"quantiles": {"10": 0.9, "50": 1.0, "90": 1.1}}],
                "mean_task_weight": {"tasks real": 1.0}} for seed in (0, 1)]
    t, weight, real = task_t_points(records)
    assert t.tolist() == [-3.0, 2.5, 0.1, -4.0, 2.5, 0.1]
    assert weight.tolist() == [1.2, 0.7, 1.0, 2.2, 0.7, 1.0]
    assert real.tolist() == [True, False, True, True, False, True]
    (tmp_path / "results").mkdir()
    for record in records:
        (tmp_path / "results" / f"meta_seed{record['seed']}.json").write_text(json.dumps(record))
    diagnose(str(tmp_path))
    assert (tmp_path / "hypergradient_t_meta.png").stat().st_size > 10_000
