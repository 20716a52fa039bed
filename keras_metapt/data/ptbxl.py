"""PTB-XL (12-lead ECG) as a TensorFlow Datasets builder reading the official layout.

The user downloads PTB-XL once and points ``manual_dir`` at the folder holding

    ptbxl_database.csv   scp_statements.csv   records100/...   records500/...

(the 100 Hz "lr" records are enough for the default config). Nothing is downloaded.

Each example: ``signal`` [1024, 12] float32 (10 s at 100 Hz = 1000 samples, z-scored per lead
with the mean and standard deviation of folds 1-9, then zero-padded to 1024), ``label`` [5]
multi-hot over the diagnostic superclasses NORM, MI, STTC, CD, HYP (a statement counts when
scp_statements.csv marks it diagnostic; its diagnostic_class is the superclass), ``ecg_id`` and
``fold``. Splits: "train" = folds 1-9 (pre-training, and the labelled FT pool), "test" = fold 10.
The 500 Hz config reads records500 (5000 samples, padded to 5120).

    builder = PtbXl(data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))

A missing folder or file, or a record with the wrong lead count or length, raises
`PtbXlError` naming it. Records without a diagnostic superclass keep an all-zero label; their
count is logged and stored in the dataset's metadata (``unlabelled_records``).
"""

import ast
import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["PtbXl", "PtbXlError", "SUPERCLASSES", "LEADS", "build_ptbxl", "ptbxl_arrays"]

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")


class PtbXlError(ValueError):
    """A missing or malformed PTB-XL file; the message names it."""


@dataclasses.dataclass
class PtbXlConfig(tfds.core.BuilderConfig):
    sampling_rate: int = 100
    samples: int = 1000
    padded_length: int = 1024
    filename_column: str = "filename_lr"


def _read_csv(path):
    if not os.path.exists(path):
        raise PtbXlError(f"PTB-XL file not found: {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _superclass_map(manual_dir):
    rows = _read_csv(os.path.join(manual_dir, "scp_statements.csv"))
    if not rows:
        raise PtbXlError(f"{manual_dir}/scp_statements.csv is empty")
    code_column = next(iter(rows[0]))  # the first (unnamed) column holds the statement code
    mapping = {}
    for row in rows:
        diagnostic = row.get("diagnostic", "")
        if diagnostic not in ("", "0", "0.0") and row.get("diagnostic_class") in SUPERCLASSES:
            mapping[row[code_column]] = row["diagnostic_class"]
    return mapping


def _read_record(manual_dir, row, config):
    import wfdb
    name = row[config.filename_column]
    path = os.path.join(manual_dir, name)
    if not os.path.exists(path + ".hea"):
        raise PtbXlError(f"record {name} (ecg_id {row['ecg_id']}) not found: {path}.hea")
    signal, fields = wfdb.rdsamp(path)
    if signal.shape != (config.samples, len(LEADS)):
        raise PtbXlError(
            f"record {name} (ecg_id {row['ecg_id']}) has shape {signal.shape} (samples, leads); "
            f"expected ({config.samples}, {len(LEADS)}) at {config.sampling_rate} Hz")
    if int(round(fields["fs"])) != config.sampling_rate:
        raise PtbXlError(f"record {name} is sampled at {fields['fs']} Hz, expected "
                         f"{config.sampling_rate}")
    return np.nan_to_num(signal.astype(np.float64))


class PtbXl(tfds.core.GeneratorBasedBuilder):
    """PTB-XL 12-lead ECG with diagnostic-superclass labels (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official layout; z-scored with folds 1-9 statistics."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download PTB-XL (https://physionet.org/content/ptb-xl/) and pass the folder holding "
        "ptbxl_database.csv, scp_statements.csv and records100/ (records500/ for 500hz) as "
        "manual_dir.")
    BUILDER_CONFIGS = [
        PtbXlConfig(name="100hz", description="records100, 1000 samples padded to 1024"),
        PtbXlConfig(name="500hz", description="records500, 5000 samples padded to 5120",
                    sampling_rate=500, samples=5000, padded_length=5120,
                    filename_column="filename_hr"),
    ]

    def _info(self):
        config = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "signal": tfds.features.Tensor(shape=(config.padded_length, len(LEADS)),
                                               dtype=np.float32),
                "label": tfds.features.Tensor(shape=(len(SUPERCLASSES),), dtype=np.float32),
                "ecg_id": np.int32,
                "fold": np.int32,
            }),
            supervised_keys=("signal", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = dl_manager.manual_dir
        if not os.path.isdir(manual_dir):
            raise PtbXlError(f"PTB-XL folder not found: {manual_dir}")
        rows = _read_csv(os.path.join(manual_dir, "ptbxl_database.csv"))
        for column in ("ecg_id", "scp_codes", "strat_fold", self.builder_config.filename_column):
            if rows and column not in rows[0]:
                raise PtbXlError(f"{manual_dir}/ptbxl_database.csv has no {column!r} column")
        superclass = _superclass_map(manual_dir)
        train = [r for r in rows if int(r["strat_fold"]) <= 9]
        test = [r for r in rows if int(r["strat_fold"]) == 10]
        if not train:
            raise PtbXlError(f"{manual_dir}/ptbxl_database.csv has no record in folds 1-9")
        # One z-score normalisation, from the training folds (streaming sums per lead).
        total = np.zeros(len(LEADS))
        total_sq = np.zeros(len(LEADS))
        count = 0
        for row in train:
            signal = _read_record(manual_dir, row, self.builder_config)
            total += signal.sum(0)
            total_sq += (signal ** 2).sum(0)
            count += len(signal)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
        unlabelled = sum(not self._labels(r, superclass).any() for r in rows)
        if unlabelled:
            print(f"PTB-XL: {unlabelled} of {len(rows)} records have no diagnostic superclass "
                  "(all-zero label, kept)")
        self.info.metadata.update({"lead_mean": mean.tolist(), "lead_std": std.tolist(),
                                   "superclasses": list(SUPERCLASSES), "leads": list(LEADS),
                                   "unlabelled_records": int(unlabelled)})
        return {"train": self._generate_examples(manual_dir, train, superclass, mean, std),
                "test": self._generate_examples(manual_dir, test, superclass, mean, std)}

    @staticmethod
    def _labels(row, superclass):
        try:
            codes = ast.literal_eval(row["scp_codes"])
        except (ValueError, SyntaxError) as error:
            raise PtbXlError(f"ecg_id {row['ecg_id']}: unreadable scp_codes "
                             f"{row['scp_codes']!r}") from error
        label = np.zeros(len(SUPERCLASSES), np.float32)
        for code in codes:
            if code in superclass:
                label[SUPERCLASSES.index(superclass[code])] = 1.0
        return label

    def _generate_examples(self, manual_dir, rows, superclass, mean, std):
        config = self.builder_config
        for row in rows:
            signal = (_read_record(manual_dir, row, config) - mean) / std
            padded = np.zeros((config.padded_length, len(LEADS)), np.float32)
            padded[:config.samples] = signal
            yield int(row["ecg_id"]), {"signal": padded, "label": self._labels(row, superclass),
                                       "ecg_id": int(row["ecg_id"]),
                                       "fold": int(row["strat_fold"])}


def build_ptbxl(manual_dir, data_dir, config="100hz"):
    """Prepares (once; later calls reuse it) and returns the PtbXl builder."""
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise PtbXlError(f"PTB-XL folder not found or empty: {manual_dir}")
    builder = PtbXl(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def ptbxl_arrays(builder, split):
    """(signals [n, L, 12], labels [n, 5], ecg_ids [n]) of a prepared split, in ecg_id order."""
    ds = builder.as_dataset(split=split, shuffle_files=False)
    signals, labels, ids = [], [], []
    for example in ds.as_numpy_iterator():
        signals.append(example["signal"])
        labels.append(example["label"])
        ids.append(example["ecg_id"])
    order = np.argsort(ids)
    return (np.stack(signals)[order], np.stack(labels)[order], np.array(ids)[order])
