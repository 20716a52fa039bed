"""The PTB-XL TFDS builder on a fixture folder in PTB-XL's layout, written with wfdb from the
real PTB record s0010_re (see tests/data/ptbxl_fixture.py).

References: the fixture's own records read back with wfdb and normalised by hand (z-score with
folds 1-9 statistics computed here in float64), and the labels stated in its CSV files.
"""

import os

import numpy as np
import pytest

from keras_metapt.data.ptbxl import SUPERCLASSES, PtbXlError, build_ptbxl, ptbxl_arrays
from tests.data.ptbxl_fixture import write_ptbxl_folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptbxl")
    records = write_ptbxl_folder(str(root / "manual"))
    builder = build_ptbxl(str(root / "manual"), str(root / "tfds"))
    return root, records, builder


def test_builder_reads_signals_normalised_with_training_statistics(built):
    import wfdb
    root, records, builder = built
    train = [r for r in records if r[1] <= 9]
    raw = {r[0]: wfdb.rdsamp(os.path.join(root, "manual", r[3]))[0] for r in records}
    stacked = np.concatenate([raw[r[0]] for r in train])
    mean, std = stacked.mean(0), stacked.std(0)
    signals, labels, ids = ptbxl_arrays(builder, "train")
    assert signals.shape == (len(train), 1024, 12) and signals.dtype == np.float32
    assert list(ids) == [r[0] for r in train]
    for signal, ecg_id in zip(signals, ids):
        np.testing.assert_allclose(signal[:1000], (raw[ecg_id] - mean) / std, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(signal[1000:], 0.0)  # zero-padded to 1024
    test_signals, _, test_ids = ptbxl_arrays(builder, "test")
    assert list(test_ids) == [r[0] for r in records if r[1] == 10]
    np.testing.assert_allclose(builder.info.metadata["lead_mean"], mean, rtol=1e-6)


def test_labels_are_the_diagnostic_superclasses(built):
    _, records, builder = built
    _, labels, ids = ptbxl_arrays(builder, "train")
    expected = {"{'NORM': 100.0, 'SR': 0.0}": {"NORM"}, "{'IMI': 80.0, 'SR': 0.0}": {"MI"},
                "{'NDT': 100.0}": {"STTC"}, "{'LAFB': 100.0, 'IMI': 15.0}": {"CD", "MI"},
                "{'LVH': 50.0, 'NDT': 100.0}": {"HYP", "STTC"}, "{'SR': 0.0}": set()}
    codes = {r[0]: r[2] for r in records}
    for label, ecg_id in zip(labels, ids):
        got = {SUPERCLASSES[i] for i in np.flatnonzero(label)}
        assert got == expected[codes[ecg_id]], ecg_id
    # records with only the rhythm statement SR keep an all-zero label and are counted
    assert builder.info.metadata["unlabelled_records"] == sum(
        codes[r[0]] == "{'SR': 0.0}" for r in records)


@pytest.mark.parametrize("corrupt, message", [("leads", "ecg_id 3.*11"), ("length", "ecg_id 3.*900")])
def test_bad_record_is_named(tmp_path, corrupt, message):
    write_ptbxl_folder(str(tmp_path / "manual"), count=5, corrupt=corrupt)
    with pytest.raises(PtbXlError, match=message):
        build_ptbxl(str(tmp_path / "manual"), str(tmp_path / "tfds"))


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(PtbXlError, match="folder not found"):
        build_ptbxl(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
    write_ptbxl_folder(str(tmp_path / "manual"), count=3)
    os.remove(tmp_path / "manual" / "scp_statements.csv")
    with pytest.raises(PtbXlError, match="scp_statements.csv"):
        build_ptbxl(str(tmp_path / "manual"), str(tmp_path / "tfds2"))
    write_ptbxl_folder(str(tmp_path / "m2"), count=3)
    os.remove(tmp_path / "m2" / "records100" / "00000" / "00002_lr.hea")
    with pytest.raises(PtbXlError, match="records100/00000/00002_lr"):
        build_ptbxl(str(tmp_path / "m2"), str(tmp_path / "tfds3"))
