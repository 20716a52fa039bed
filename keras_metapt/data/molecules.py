"""Molecules as graphs, from SMILES with RDKit (the pre-training-GNNs featurisation).

Node features (2 categorical columns): atomic number - 1 (0..117; 118 = other) and chirality
tag (unspecified, tetrahedral CW, tetrahedral CCW, other). Edge features (2 columns): bond
type (single, double, triple, aromatic; 4 = other) and bond direction (none, end-up-right,
end-down-right; 3 = other). Each bond is listed in both directions.
"""

import numpy as np

__all__ = ["NODE_VOCAB_SIZES", "EDGE_VOCAB_SIZES", "smiles_to_graph", "InvalidSmilesError"]

NODE_VOCAB_SIZES = (119, 4)
EDGE_VOCAB_SIZES = (5, 4)


class InvalidSmilesError(ValueError):
    """RDKit could not parse a SMILES string (or it has no atoms)."""


def _chem():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as e:  # pragma: no cover - rdkit is a declared dependency
        raise ImportError("molecule graphs need RDKit: pip install rdkit") from e
    RDLogger.DisableLog("rdApp.*")  # parse errors are reported by InvalidSmilesError instead
    return Chem


def smiles_to_graph(smiles, where=None):
    """A graph dict (see `keras_metapt.data.graphs`) for one SMILES string.

    ``where`` (e.g. "file.csv, row 12") is included in the error for an invalid SMILES.
    """
    chem = _chem()
    mol = chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles.strip() else None
    if mol is None or mol.GetNumAtoms() == 0:
        place = f" ({where})" if where else ""
        raise InvalidSmilesError(f"invalid SMILES{place}: {smiles!r}")
    chirality = {chem.ChiralType.CHI_UNSPECIFIED: 0, chem.ChiralType.CHI_TETRAHEDRAL_CW: 1,
                 chem.ChiralType.CHI_TETRAHEDRAL_CCW: 2}
    bond_types = {chem.BondType.SINGLE: 0, chem.BondType.DOUBLE: 1, chem.BondType.TRIPLE: 2,
                  chem.BondType.AROMATIC: 3}
    directions = {chem.BondDir.NONE: 0, chem.BondDir.ENDUPRIGHT: 1, chem.BondDir.ENDDOWNRIGHT: 2}
    nodes = np.array([[min(atom.GetAtomicNum() - 1, 118), chirality.get(atom.GetChiralTag(), 3)]
                      for atom in mol.GetAtoms()], np.int32)
    edges, features = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        f = [bond_types.get(bond.GetBondType(), 4), directions.get(bond.GetBondDir(), 3)]
        edges += [(i, j), (j, i)]
        features += [f, f]
    return {"node_features": nodes,
            "edge_index": np.array(edges, np.int32).reshape(-1, 2),
            "edge_features": np.array(features, np.int32).reshape(-1, 2)}
