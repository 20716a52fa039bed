"""apps/runner.py: config from flags, resume that checks the stored config, arms that do not
depend on the arms run before them, and the paired summary.

References: scipy's paired t-test interval (`ttest_rel(...).confidence_interval`) for the
paired differences; a run of one arm alone for "an earlier arm changes nothing".
"""

import dataclasses
import json

import numpy as np
import pytest
from absl import app, flags
from scipy import stats

from apps import runner


@pytest.fixture(autouse=True)
def no_global_op_determinism(monkeypatch):
    """Op determinism cannot be switched off again through the public API and would change
    kernels for the tests that run after these in the same process; the apps' own runs
    (subprocesses, tests/faults/test_kill_and_resume.py) enable it."""
    import tensorflow as tf
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(runner.GridConfig):
    lr: float
    verbose: int = 0

    ARMS = ("base", "other", "third")
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose",)


def toy_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), resume=True, strategy="default", devices=None,
                  tpu_address=None, arms=("base", "other"), seeds=("0", "1"), baseline="base",
                  lr=0.1)
    values.update(overrides)
    return ToyConfig(**values)


def random_arm(arm, seed, context):
    """Draws from every generator an app uses (TF, Keras initialisers, NumPy)."""
    import keras
    import tensorflow as tf
    layer = keras.layers.Dense(3)
    layer.build((None, 2))
    return {"tf": float(tf.random.uniform([])), "np": float(np.random.rand()),
            "kernel": layer.kernel.numpy().tolist(), "test_auroc_full": 0.5 + 0.1 * seed
            + (0.05 if arm == "other" else 0.0) + 0.01 * seed ** 2}


def test_config_from_flags_and_validation(tmp_path):
    values = flags.FlagValues()
    runner.define_strategy_flags("the toy", flag_values=values)
    runner.define_strategy_flags("the toy", flag_values=values)  # a second call keeps the first
    assert "tf.distribute strategy of the toy" in values["strategy"].help
    flags.DEFINE_list("arms", ["base", "other"], "", flag_values=values)
    flags.DEFINE_list("seeds", ["0", "1"], "", flag_values=values)
    flags.DEFINE_string("baseline", "base", "", flag_values=values)
    flags.DEFINE_float("lr", 0.1, "", flag_values=values)
    flags.DEFINE_integer("verbose", 0, "", flag_values=values)
    flags.DEFINE_string("output_dir", str(tmp_path), "", flag_values=values)
    flags.DEFINE_bool("resume", True, "", flag_values=values)
    values(["prog", "--seeds=3,4", "--lr=0.5", "--devices=/cpu:0"])
    config = ToyConfig.from_flags(values)
    assert config.seeds == (3, 4) and config.arms == ("base", "other") and config.lr == 0.5
    assert config.devices == ("/cpu:0",) and config.last_seed == 4
    # what is stored with each result: no output paths, no verbosity, no arm or seed lists
    assert config.results_config() == {"strategy": "default", "devices": ["/cpu:0"], "lr": 0.5}
    with pytest.raises(app.UsageError, match="arms"):
        toy_config(tmp_path, arms=("base", "nope"))
    with pytest.raises(app.UsageError, match="seeds"):
        toy_config(tmp_path, seeds=("0", "x"))


def test_resume_reuses_only_results_made_with_the_same_settings(tmp_path, capsys):
    calls = []

    def run_arm(arm, seed, context):
        calls.append((arm, seed, context))
        return {"test_auroc_full": 0.5}

    def prepare(seed):
        return f"data of seed {seed}"

    config = toy_config(tmp_path)
    runner.run_grid(config, run_arm, prepare)
    assert calls == [("base", 0, "data of seed 0"), ("other", 0, "data of seed 0"),
                     ("base", 1, "data of seed 1"), ("other", 1, "data of seed 1")]
    stored = json.load(open(tmp_path / "results" / "other_seed1.json"))
    assert stored["config"] == config.results_config() and stored["arm"] == "other"

    calls.clear()
    records = runner.run_grid(toy_config(tmp_path, verbose=2), run_arm, prepare)
    assert calls == [] and len(records) == 4
    assert capsys.readouterr().out.count("done earlier") == 4

    calls.clear()
    runner.run_grid(toy_config(tmp_path, lr=0.2, seeds=("1",)), run_arm, prepare)
    assert calls == [("base", 1, "data of seed 1"), ("other", 1, "data of seed 1")]
    out = capsys.readouterr().out
    assert "made with other settings (lr: 0.1 -> 0.2); running it again" in out

    calls.clear()
    runner.run_grid(toy_config(tmp_path, lr=0.2, seeds=("1",), resume=False), run_arm, prepare)
    assert len(calls) == 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArmSettingConfig(ToyConfig):
    other_rate: float = 1.0

    ARM_SETTINGS = {"other": ("other_rate",)}


def test_a_setting_of_one_arm_reruns_that_arm_alone(tmp_path, capsys):
    """Reference: the calls made and the stored configs; ``other_rate`` is read by "other"
    only, so changing it reruns "other" and nothing else, and a result stored before the
    setting was left out of the other arms' configs (with the key) is still reused."""
    calls = []

    def run_arm(arm, seed, context):
        calls.append((arm, seed))
        return {"test_auroc_full": 0.5}

    config = ArmSettingConfig(**{**dataclasses.asdict(toy_config(tmp_path)), "seeds": ("0",)})
    assert config.unread_settings("base") == ("other_rate",)
    assert config.unread_settings("other") == ()
    assert config.results_config_of("base") == {"strategy": "default", "devices": None,
                                                "lr": 0.1}
    assert config.results_config_of("other")["other_rate"] == 1.0
    runner.run_grid(config, run_arm)
    assert calls == [("base", 0), ("other", 0)]
    # a "base" result stored with every setting, as before the arm settings were split
    path = tmp_path / "results" / "base_seed0.json"
    stored = json.load(open(path))
    assert "other_rate" not in stored["config"]
    stored["config"]["other_rate"] = 1.0
    path.write_text(json.dumps(stored))
    calls.clear()
    changed = dataclasses.replace(config, other_rate=0.5)
    runner.run_grid(changed, run_arm)
    assert calls == [("other", 0)]
    assert "other_rate: 1.0 -> 0.5" in capsys.readouterr().out
    # checkpoint folders follow the same rule
    directory = str(tmp_path / "ckpt")
    assert not runner.claim_directory(directory, config, "base")
    (tmp_path / "ckpt" / "state").write_text("x")
    assert runner.claim_directory(directory, changed, "base")
    assert not runner.claim_directory(directory, changed)  # the whole config: other_rate differs


def test_an_arm_does_not_depend_on_the_arms_run_before_it(tmp_path):
    both = runner.run_grid(toy_config(tmp_path / "both"), random_arm)
    alone = runner.run_grid(toy_config(tmp_path / "alone", arms=("other",)), random_arm)
    for seed in (0, 1):
        first, second = both[("other", seed)], alone[("other", seed)]
        assert {k: first[k] for k in ("tf", "np", "kernel")} == \
            {k: second[k] for k in ("tf", "np", "kernel")}
    assert both[("base", 0)]["tf"] == both[("other", 0)]["tf"]  # same seed, same draws
    assert both[("base", 0)]["tf"] != both[("base", 1)]["tf"]


def test_summary_pairs_seeds_with_a_t_interval(tmp_path):
    config = toy_config(tmp_path, arms=("base", "other", "third"), seeds=("0", "1", "2"))
    records = runner.run_grid(config, random_arm)
    table, summary = runner.summarise(records, config, ("full",))
    base = [records[("base", s)]["test_auroc_full"] for s in (0, 1, 2)]
    other = [records[("other", s)]["test_auroc_full"] for s in (0, 1, 2)]
    assert summary["other"]["full_mean"] == pytest.approx(np.mean(other))
    assert summary["other"]["full_std"] == pytest.approx(np.std(other))
    assert summary["other"]["per_seed"]["2"] == {"full": other[2]}
    paired = summary["other"]["paired"]
    assert paired["baseline"] == "base" and "paired" not in summary["base"]
    assert paired["full"]["mean_difference"] == pytest.approx(0.05)
    # a constant difference: a zero-width interval
    assert paired["full"]["ci95"] == pytest.approx([0.05, 0.05])
    third = [r + d for r, d in zip(base, (0.01, -0.03, 0.04))]
    records.update({("third", s): {**records[("third", s)], "test_auroc_full": v}
                    for s, v in zip((0, 1, 2), third)})
    _, summary = runner.summarise(records, config, ("full",))
    reference = stats.ttest_rel(third, base).confidence_interval(0.95)
    assert summary["third"]["paired"]["full"]["ci95"] == pytest.approx(
        [reference.low, reference.high])
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
    text = (tmp_path / "summary.md").read_text()
    assert "| arm | full FT test AUROC | PT examples/s | seeds |" in table
    assert "Paired difference to base" in text and "| third | +0.0067 [" in text

    one_seed = {k: v for k, v in records.items() if k[1] == 0}
    _, summary = runner.summarise(one_seed, config, ("full",))
    assert summary["other"]["paired"]["full"]["ci95"] is None


def test_claim_directory_empties_state_of_other_settings(tmp_path, capsys):
    directory = tmp_path / "ckpt"
    assert not runner.claim_directory(str(directory), toy_config(tmp_path))
    (directory / "state").write_text("x")
    assert runner.claim_directory(str(directory), toy_config(tmp_path, verbose=1))
    assert (directory / "state").exists()
    assert not runner.claim_directory(str(directory), toy_config(tmp_path, lr=0.3))
    assert not (directory / "state").exists()
    assert "lr: 0.1 -> 0.3" in capsys.readouterr().out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionConfig(ToyConfig):
    dtype_policy: str


def test_dtype_policy_flag_sets_the_global_keras_policy_in_setup(tmp_path, monkeypatch):
    import keras
    import tensorflow as tf
    # setup's one inter-op thread can only be set before TensorFlow starts (earlier tests ran)
    monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", lambda n: None)
    values = flags.FlagValues()
    runner.define_strategy_flags("the toy", flag_values=values)
    runner.define_dtype_policy_flag(flag_values=values)
    for name, default in (("arms", ["base"]), ("seeds", ["0"])):
        flags.DEFINE_list(name, default, "", flag_values=values)
    flags.DEFINE_string("baseline", "base", "", flag_values=values)
    flags.DEFINE_float("lr", 0.1, "", flag_values=values)
    flags.DEFINE_integer("verbose", 0, "", flag_values=values)
    flags.DEFINE_string("output_dir", str(tmp_path), "", flag_values=values)
    flags.DEFINE_bool("resume", True, "", flag_values=values)
    assert "mixed_float16" in values["dtype_policy"].help
    values(["prog", "--dtype_policy=mixed_bfloat16"])
    try:
        config, _ = runner.setup(PrecisionConfig, values)
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert config.results_config()["dtype_policy"] == "mixed_bfloat16"  # part of results
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--dtype_policy=float64"])


def test_resume_run_restores_the_checkpoint_and_drops_history_rows_past_it(tmp_path):
    """Reference: the rows written up to the last checkpoint, by hand; a row written after it
    (a run killed before saving) is dropped, by key and by count; a list the run added
    outside the given row names (one entry per process) comes back whole."""
    import tensorflow as tf
    for key in ("step", None):
        directory = tmp_path / f"run_{key}"
        directory.mkdir()
        step = tf.Variable(0, dtype=tf.int64)
        history, save = runner.resume_run(str(directory), {"step": step}, {"step": [], "x": []},
                                          step.numpy, key=key)
        assert history == {"step": [], "x": []}
        history["per_process"] = [0.5]  # one entry, fewer than the rows below
        for value in (1, 2):
            step.assign(value)
            history["step"].append(value)
            history["x"].append(10.0 * value)
            save(history)
        history["step"].append(3)
        history["x"].append(30.0)
        runner.write_json(str(directory / "history.json"), history)  # no checkpoint for row 3
        restored_step = tf.Variable(0, dtype=tf.int64)
        resumed, _ = runner.resume_run(str(directory), {"step": restored_step},
                                       {"step": [], "x": []}, restored_step.numpy, key=key)
        assert int(restored_step) == 2
        assert resumed == {"step": [1, 2], "x": [10.0, 20.0], "per_process": [0.5]}


def test_mean_and_interval_is_the_normal_interval_of_the_mean():
    values = [0.5, 0.75, 1.0, 0.25]
    mean, half = runner.mean_and_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx(1.96 * np.std(values, ddof=1) / 2.0)
    assert np.isnan(runner.mean_and_interval([0.3])[1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineToyConfig(ToyConfig):
    dtype_policy: str = "float32"


def test_online_arm_checks_and_record_fields(tmp_path):
    """check_online_arm: an arm not asked for passes; mixed precision and several replicas are
    refused by name. hyperdistill_fields: the estimator's own scale and state counters."""
    import keras_metapt as km
    import tensorflow as tf

    config = OnlineToyConfig(**dataclasses.asdict(toy_config(tmp_path)))
    runner.check_online_arm(config, "third", replicas=2)  # not among the arms
    runner.check_online_arm(config, "other", replicas=1)
    with pytest.raises(app.UsageError, match="--arms=other runs on one replica, not 2"):
        runner.check_online_arm(config, "other", replicas=2)
    mixed = dataclasses.replace(config, dtype_policy="mixed_bfloat16")
    with pytest.raises(app.UsageError, match="float32.*--dtype_policy=mixed_bfloat16"):
        runner.check_online_arm(mixed, "other")
    assert runner.hyperdistill_fields(None) == {}
    online = km.HyperDistill(km.optim.sgd(0.1), 0.9).start([tf.zeros(2)])
    online.advance(3)
    assert runner.hyperdistill_fields(online) == {
        "hyperdistill_scale": float(online.scale), "hyperdistill_references": 0,
        "hyperdistill_steps": 3}


def test_one_sample_t_is_scipys_t_statistic_per_column():
    """Reference: scipy.stats.ttest_1samp against 0, column by column; a constant zero column
    gives 0 rather than NaN."""
    samples = np.random.default_rng(3).normal(0.2, 1.0, (9, 4))
    np.testing.assert_allclose(runner.one_sample_t(samples),
                               stats.ttest_1samp(samples, 0.0).statistic, rtol=1e-12)
    assert runner.one_sample_t(np.zeros((5, 2))).tolist() == [0.0, 0.0]
