"""keras_metapt.data.splits on real molecules shipped with RDKit.

References: the Bemis-Murcko scaffolds computed by RDKit directly (no scaffold on both sides),
the requested fraction and tolerance, and the label counts of each part counted here.
"""

import os

import numpy as np
import pytest
from rdkit.Chem.Scaffolds import MurckoScaffold

from keras_metapt.data import embedded
from keras_metapt.data.splits import SplitError, describe_split, scaffold_split


def scaffold(s):
    return MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)


@pytest.mark.parametrize("seed", [0, 1, None])
def test_scaffold_split_of_the_embedded_task_honours_fraction_and_scaffolds(seed):
    smiles, labels, _ = embedded.finetuning_set()
    train, test = scaffold_split(smiles, 0.2, seed)
    assert len(train) + len(test) == len(smiles)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(smiles)))
    assert abs(len(test) / len(smiles) - 0.2) <= 0.05
    assert not {scaffold(smiles[i]) for i in train} & {scaffold(smiles[i]) for i in test}
    lines = describe_split(labels, {"train": train, "test": test}, smiles)
    positives = int(labels[test].sum())
    assert lines[1].startswith(f"test: {len(test)} molecules (20%), positives "
                               f"{positives / len(test):.0%}")
    assert lines[1].endswith(f"{len({scaffold(smiles[i]) for i in test})} scaffold groups")


def test_a_dominant_scaffold_group_refuses_instead_of_a_lopsided_split():
    # real molecules: acyclic ones (one scaffold group, "") as half of the set, the other
    # half with ring systems; no assignment of whole groups gives a 20% test set for seeds
    # that place the acyclic group last
    from rdkit import RDConfig
    nci = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
    pool = [line.split()[0] for line in open(nci) if line.strip()][:1500]
    acyclic = [s for s in pool if scaffold(s) == ""][:150]
    ringed = [s for s in pool if scaffold(s) != ""][:150]
    smiles = ringed + acyclic
    outcomes = []
    for seed in range(8):
        try:
            train, test = scaffold_split(smiles, 0.2, seed)
            outcomes.append(len(test) / len(smiles))
        except SplitError as error:
            assert f"{len(smiles)} molecules" in str(error) and "largest: [150" in str(error)
            assert "requested 0.2" in str(error)
            outcomes.append(None)
    assert None in outcomes  # the greedy fill left the acyclic group for the test set
    assert all(o is None or abs(o - 0.2) <= 0.05 for o in outcomes)
    # largest group first (seed None) always puts it in train
    train, test = scaffold_split(smiles, 0.2, None)
    assert set(range(150, 300)) <= set(train.tolist())


def test_fraction_outside_the_unit_interval_is_refused():
    with pytest.raises(SplitError, match="test_fraction=1.5"):
        scaffold_split(["CCO", "c1ccccc1"], 1.5)
