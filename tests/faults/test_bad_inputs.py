"""The graph app on CSV files with bad rows: skipped rows leave the split a scaffold split of
the rows kept; a non-UTF-8 byte and a label outside {0, 1} stop the app with a message naming
file and line or row (exit code 1), before any training.

References: RDKit's Bemis-Murcko scaffolds (no scaffold on both sides of the split), the
rows written here (which ones are bad), and the requested test fraction.
"""

import json
import os
import subprocess
import sys

from rdkit.Chem.Scaffolds import MurckoScaffold

from keras_metapt.data import embedded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOAD = """
import json, sys
from absl import flags
import apps.multitask_pt as m
flags.FLAGS(["prog"] + json.loads(sys.argv[1]))
data = m.load_data(m.Config.from_flags())
print(json.dumps({"train": data.train_idx.tolist(), "test": data.test_idx.tolist(),
                  "labels": data.ft_labels[:, 0].tolist(), "num_pt": len(data.pt_graphs),
                  "pt_smiles": data.pt_smiles, "is_real": data.is_real.tolist()}))
"""


def write_csvs(tmp_path, ft_rows_extra):
    smiles, labels, _ = embedded.finetuning_set()
    pt = tmp_path / "pt.csv"
    pt.write_text("smiles,a,b\n" + "".join(f"{s},{i % 2},{(i // 2) % 2}\n"
                                           for i, s in enumerate(smiles[300:360])))
    ft = tmp_path / "ft.csv"
    body = "".join(f"{s},{int(y)}\n" for s, y in zip(smiles[:300], labels[:300, 0]))
    ft.write_bytes(b"smiles,label\n" + body.encode() + ft_rows_extra)
    return smiles[:300], labels[:300, 0], pt, ft


def scaffold(s):
    return MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)


def test_skipped_rows_keep_a_scaffold_split_of_the_rows_kept(tmp_path):
    bad = b"not_a_smiles,1\nC\xe9C,0\nCCO,1\n"  # invalid SMILES, not UTF-8, a good row
    smiles, labels, pt, ft = write_csvs(tmp_path, bad)
    flags = [f"--pt_csv={pt}", f"--ft_csv={ft}", "--on_error=skip", f"--output_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps(flags)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FT split (scaffold, seed 0): train: " in proc.stdout
    split = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = smiles + ["CCO"]
    assert split["labels"] == [float(y) for y in labels] + [1.0]
    assert sorted(split["train"] + split["test"]) == list(range(len(kept)))
    assert not ({scaffold(kept[i]) for i in split["train"]}
                & {scaffold(kept[i]) for i in split["test"]})
    assert abs(len(split["test"]) / len(kept) - 0.2) <= 0.05 and split["num_pt"] == 60
    assert all(split["is_real"])  # own PT data: no control tasks unless asked


def run_app(tmp_path, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "apps", "multitask_pt.py"),
                           f"--output_dir={tmp_path / 'out'}", *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_non_utf8_and_non_binary_labels_stop_the_app_naming_the_row(tmp_path):
    _, _, pt, ft = write_csvs(tmp_path, b"CCO,1\nC\xe9C,0\n")
    proc = run_app(tmp_path, f"--pt_csv={pt}", f"--ft_csv={ft}")
    assert proc.returncode == 1
    assert f"{ft}, line 303: not UTF-8 (byte 0xe9 at column 2)" in proc.stderr
    _, _, pt, ft = write_csvs(tmp_path, b"CCO,2\n")
    proc = run_app(tmp_path, f"--pt_csv={pt}", f"--ft_csv={ft}")
    assert proc.returncode == 1
    assert f"{ft}, row 302, column 'label': label '2' is not 0 or 1" in proc.stderr
    assert not (tmp_path / "out" / "results").exists()


def test_the_embedded_pt_pool_adds_the_ft_training_molecules_and_no_test_molecule(tmp_path):
    """Reference: RDKit's PT molecules (embedded.pretraining_smiles) and the FT split printed
    by the same run; the test molecules must not reach PT, as task labels or otherwise."""
    flags = ["--max_pt_molecules=40", "--task_families=fragment", f"--output_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps(flags)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = json.loads(proc.stdout.strip().splitlines()[-1])
    ft_smiles, _, _ = embedded.finetuning_set()
    assert split["pt_smiles"] == (embedded.pretraining_smiles(40)
                                  + [ft_smiles[i] for i in split["train"]])
    assert not {ft_smiles[i] for i in split["test"]} & set(split["pt_smiles"])
    assert sum(not r for r in split["is_real"]) == round(0.25 * len(split["is_real"]))
