"""SMILES featurisation with RDKit, on real molecules.

References: atom, bond, chirality and direction counts written out by hand for each SMILES;
the molecules shipped with RDKit (NCI first_5K.smi) for parsing at scale.
"""

import os

import numpy as np
import pytest

from keras_metapt.data import batch_graphs, smiles_to_graph
from keras_metapt.data.molecules import InvalidSmilesError


def test_l_alanine():
    # C[C@H](N)C(=O)O: 6 heavy atoms, 5 bonds (one double), one CCW stereocentre.
    g = smiles_to_graph("C[C@H](N)C(=O)O")
    assert g["node_features"][:, 0].tolist() == [5, 5, 6, 5, 7, 7]  # C C N C O O (Z - 1)
    assert g["node_features"][:, 1].tolist() == [0, 2, 0, 0, 0, 0]
    assert g["edge_index"].shape == (10, 2)
    assert sorted(g["edge_features"][:, 0].tolist()) == [0] * 8 + [1] * 2


def test_aromatic_and_directional_bonds():
    benzene = smiles_to_graph("c1ccccc1")
    assert set(benzene["edge_features"][:, 0].tolist()) == {3}
    trans = smiles_to_graph("C/C=C/Cl")
    assert set(trans["edge_features"][:, 1].tolist()) >= {1}  # a bond with ENDUPRIGHT


def test_invalid_smiles_is_named():
    with pytest.raises(InvalidSmilesError, match=r"data.csv, row 3.*'C1CC'"):
        smiles_to_graph("C1CC", where="data.csv, row 3")
    with pytest.raises(InvalidSmilesError):
        smiles_to_graph("")


def test_rdkit_shipped_molecules_parse_and_batch():
    from rdkit import RDConfig
    path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
    smiles = [line.split()[0] for line in open(path).read().splitlines()[:200] if line.strip()]
    graphs = [smiles_to_graph(s, where=f"first_5K.smi, line {i + 1}") for i, s in enumerate(smiles)]
    batch = batch_graphs(graphs)
    assert batch["node_mask"].sum() == sum(len(g["node_features"]) for g in graphs)
    assert batch["edge_mask"].sum() == sum(len(g["edge_index"]) for g in graphs)
    # every real edge stays inside its own graph
    real = batch["edge_mask"] > 0
    src, dst = batch["edge_index"][real].T
    np.testing.assert_array_equal(batch["node_graph"][src], batch["node_graph"][dst])


def test_batching_errors():
    with pytest.raises(ValueError, match="no nodes"):
        batch_graphs([{"node_features": np.zeros((0, 2), np.int32),
                       "edge_index": np.zeros((0, 2), np.int32),
                       "edge_features": np.zeros((0, 2), np.int32)}])
    with pytest.raises(ValueError, match="largest bucket"):
        batch_graphs([smiles_to_graph("CCO")], node_buckets=(2,))
