"""The embedded molecular benchmark: everything ships with the RDKit wheel, nothing downloads.

* PT molecules: RDKit's ``Data/NCI/first_5K.smi`` (4,999) and
  ``Data/Pains/test_data/wehi_mols.csv`` (10,000), about 15k molecules.
* PT tasks: presence (count > 0) of each of RDKit's 85 ``fr_*`` fragments; tasks constant over
  the molecules used are dropped.
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

__all__ = ["ACTIVITY_THRESHOLD", "pretraining_smiles", "fragment_labels", "finetuning_set",
           "scaffold_split"]

ACTIVITY_THRESHOLD = 7.0


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


def fragment_labels(smiles, cache=None):
    """[n, T] float32 presence of each non-constant ``fr_*`` fragment, and the task names.

    ``cache``: an .npz path; computed once (about a minute for 15k molecules) and reused when
    the SMILES list matches.
    """
    if cache and os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as data:
            if list(data["smiles"]) == list(smiles):
                return data["labels"], [str(t) for t in data["tasks"]]
    from rdkit import Chem
    from rdkit.Chem import Descriptors
    fragments = [(name, fn) for name, fn in Descriptors.descList if name.startswith("fr_")]
    labels = np.zeros((len(smiles), len(fragments)), np.float32)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        labels[i] = [fn(mol) > 0 for _, fn in fragments]
    varying = labels.min(0) != labels.max(0)
    labels, tasks = labels[:, varying], [n for (n, _), keep in zip(fragments, varying) if keep]
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, labels=labels, tasks=np.array(tasks), smiles=np.array(smiles))
    return labels, tasks


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
