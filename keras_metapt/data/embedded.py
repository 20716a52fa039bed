"""The embedded molecular benchmark: everything ships with the RDKit wheel, nothing downloads.

* PT molecules: RDKit's ``Data/NCI/first_5K.smi`` (4,999) and
  ``Data/Pains/test_data/wehi_mols.csv`` (10,000), about 15k molecules.
* PT tasks (`pretraining_tasks`), in three families, each label computed from the molecule:
  ``fragment`` (presence of each of RDKit's 85 ``fr_*`` fragments), ``morgan`` (each bit of a
  2,048-bit radius-2 Morgan fingerprint) and ``descriptor`` (each non-fragment RDKit descriptor
  above its median over the molecules given). Tasks whose positive rate lies outside
  [min_rate, 1 - min_rate] are dropped; on the default 3,000 + FT molecules about 500 remain.
* FT task: measured activities of ``Contrib/FreeWilson/data/CHEMBL2321810_act.csv`` (1,017
  molecules, pIC50), binarised at pIC50 >= 7.0 (IC50 <= 100 nM; 35% active).
* Split: Bemis-Murcko scaffold split of the FT molecules (`keras_metapt.data.splits`), into
  train / test; the MetaTrain / MetaVal sets are carved from the train part, the test part is
  never used for training or model selection.
"""

import csv
import os

import numpy as np

from keras_metapt.data.splits import scaffold_split  # noqa: F401  (the split the FT task uses)

__all__ = ["ACTIVITY_THRESHOLD", "TASK_FAMILIES", "pretraining_smiles", "pretraining_tasks",
           "task_family", "fragment_labels", "finetuning_set", "scaffold_split"]

ACTIVITY_THRESHOLD = 7.0
TASK_FAMILIES = ("fragment", "morgan", "descriptor")
_PREFIX = {"fragment": "fr_", "morgan": "morgan_", "descriptor": "desc_"}


def _rdkit_paths():
    from rdkit import RDConfig
    return {"nci": os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi"),
            "wehi": os.path.join(RDConfig.RDDataDir, "Pains", "test_data", "wehi_mols.csv"),
            "act": os.path.join(RDConfig.RDContribDir, "FreeWilson", "data", "CHEMBL2321810_act.csv"),
            "smi": os.path.join(RDConfig.RDContribDir, "FreeWilson", "data", "CHEMBL2321810.smi")}


def pretraining_smiles(max_molecules=None, seed=0):
    """SMILES of the PT molecules (valid ones only), shuffled with ``seed``."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    paths = _rdkit_paths()
    smiles = [line.split()[0] for line in open(paths["nci"]) if line.strip()]
    with open(paths["wehi"], newline="") as f:
        smiles += [row[0] for row in csv.reader(f) if row]
    smiles = [s for s in smiles if Chem.MolFromSmiles(s) is not None and Chem.MolFromSmiles(s).GetNumAtoms()]
    order = np.random.default_rng(seed).permutation(len(smiles))
    smiles = [smiles[i] for i in order]
    return smiles[:max_molecules] if max_molecules else smiles


def task_family(task_name):
    """The family ("fragment", "morgan" or "descriptor") of a `pretraining_tasks` name."""
    for family, prefix in _PREFIX.items():
        if task_name.startswith(prefix):
            return family
    raise ValueError(f"{task_name!r} is not a pretraining_tasks name (prefixes: "
                     f"{', '.join(_PREFIX.values())})")


def _family_columns(family, mols):
    """([n, m] float values, m names) of one family before thresholding."""
    from rdkit.Chem import Descriptors, rdFingerprintGenerator
    if family == "fragment":
        fns = [(name, fn) for name, fn in Descriptors.descList if name.startswith("fr_")]
        return np.array([[fn(m) > 0 for _, fn in fns] for m in mols], np.float64), [n for n, _ in fns]
    if family == "morgan":
        generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
        bits = np.array([generator.GetFingerprintAsNumPy(m) for m in mols], np.float64)
        return bits, [f"morgan_{i}" for i in range(bits.shape[1])]
    fns = [(name, fn) for name, fn in Descriptors.descList if not name.startswith("fr_")]
    values = np.array([[fn(m) for _, fn in fns] for m in mols], np.float64)
    values[~np.isfinite(values)] = np.nan
    medians = np.nanmedian(values, axis=0)
    with np.errstate(invalid="ignore"):
        above = np.where(np.isnan(values), 0.0, values > medians).astype(np.float64)
    return above, [f"desc_{name}>{median:.4g}" for (name, _), median in zip(fns, medians)]


def pretraining_tasks(smiles, families=TASK_FAMILIES, min_rate=0.02, cache=None):
    """[n, T] float32 0/1 PT labels of ``smiles`` and the T task names (see `task_family`).

    Each family's labels are computed by RDKit from the molecule; a task is kept when its
    positive rate over ``smiles`` lies in [min_rate, 1 - min_rate]. Cost: about 15 ms a
    molecule (the descriptor family dominates). ``cache``: an .npz path, reused when SMILES,
    families and min_rate match.
    """
    families = tuple(families)
    unknown = sorted(set(families) - set(TASK_FAMILIES))
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {TASK_FAMILIES}, got {families}")
    key = np.array([",".join(families), repr(float(min_rate))])
    if cache and os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as data:
            if ("key" in data.files and list(data["key"]) == list(key)
                    and list(data["smiles"]) == list(smiles)):
                return data["labels"], [str(t) for t in data["tasks"]]
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    bad = [i for i, m in enumerate(mols) if m is None]
    if bad:
        raise ValueError(f"invalid SMILES at positions {bad[:5]}: {[smiles[i] for i in bad[:5]]}")
    columns, tasks = [], []
    for family in families:
        values, names = _family_columns(family, mols)
        rate = values.mean(0)
        keep = (rate >= min_rate) & (rate <= 1 - min_rate)
        columns.append(values[:, keep])
        tasks += [n for n, k in zip(names, keep) if k]
    labels = np.concatenate(columns, axis=1).astype(np.float32)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = cache + ".tmp.npz"  # renamed when complete: a killed run leaves no half file
        np.savez(tmp, labels=labels, tasks=np.array(tasks), smiles=np.array(smiles), key=key)
        os.replace(tmp, cache)
    return labels, tasks


def fragment_labels(smiles, cache=None):
    """[n, T] float32 presence of each non-constant ``fr_*`` fragment, and the task names
    (`pretraining_tasks` with the fragment family alone, every non-constant task kept)."""
    return pretraining_tasks(smiles, ("fragment",), min_rate=1e-12, cache=cache)


def finetuning_set():
    """(smiles, labels [n, 1] float32 in {0, 1}, pIC50 [n]) of the CHEMBL2321810 task."""
    paths = _rdkit_paths()
    smiles_of = {}
    for line in open(paths["smi"]):
        parts = line.split()
        if len(parts) >= 2:
            smiles_of[parts[1]] = parts[0]
    smiles, activity = [], []
    with open(paths["act"], newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] in smiles_of:
                smiles.append(smiles_of[row["Name"]])
                activity.append(float(row["Act"]))
    activity = np.array(activity)
    return smiles, (activity >= ACTIVITY_THRESHOLD).astype(np.float32)[:, None], activity
