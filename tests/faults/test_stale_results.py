"""Results are keyed by the whole configuration, data included: a rerun in the same output
directory with other data under the same path runs again instead of reusing old results.

Reference: hashlib.sha256 of the file bytes, computed here; the run_arm calls counted.
"""

import dataclasses
import hashlib
import json
from typing import Optional

import pytest

from apps import runner


@pytest.fixture(autouse=True)
def no_global_op_determinism(monkeypatch):
    import tensorflow as tf
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CsvConfig(runner.GridConfig):
    ft_csv: Optional[str]
    rate: float = 0.5

    ARMS = ("base",)
    DATA_PATHS = ("ft_csv",)
    BOUNDS = {"rate": "(0, 1]"}


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), resume=True, strategy="default",
                  devices=None, tpu_address=None, arms=("base",), seeds=("0",),
                  baseline="base", ft_csv=str(tmp_path / "task.csv"))
    values.update(overrides)
    return CsvConfig(**values)


def test_other_data_under_the_same_path_is_not_taken_for_the_same_run(tmp_path, capsys):
    csv = tmp_path / "task.csv"
    csv.write_text("smiles,label\nCCO,1\n")
    calls = []

    def run_arm(arm, seed, context):
        calls.append(arm)
        return {"test_auroc_full": 0.5 + 0.1 * len(calls)}

    first = config(tmp_path)
    assert first.results_config()["ft_csv_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    runner.run_grid(first, run_arm)
    stored = json.load(open(tmp_path / "out" / "results" / "base_seed0.json"))
    assert stored["config_sha256"] == hashlib.sha256(
        json.dumps(first.results_config(), sort_keys=True).encode()).hexdigest()
    runner.run_grid(config(tmp_path), run_arm)
    assert calls == ["base"]  # same data: reused

    csv.write_text("smiles,label\nCCO,0\n")  # another task, same path
    records = runner.run_grid(config(tmp_path), run_arm)
    assert calls == ["base", "base"] and records[("base", 0)]["test_auroc_full"] == 0.7
    assert "made with other settings (ft_csv_sha256: " in capsys.readouterr().out


def test_a_folder_digest_follows_contents_and_names(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01")
    before = runner.data_digest(str(folder))
    (folder / "a.bin").write_bytes(b"\x00\x02\x03")
    changed = runner.data_digest(str(folder))
    (folder / "a.bin").rename(folder / "b.bin")
    renamed = runner.data_digest(str(folder))
    assert len({before, changed, renamed}) == 3


def test_bounds_name_the_flag(tmp_path):
    with pytest.raises(runner.app.UsageError, match=r"^--rate=0.0: must lie in \(0, 1\]$"):
        config(tmp_path, rate=0.0)
    assert config(tmp_path, rate=1.0).rate == 1.0
