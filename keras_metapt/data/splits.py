"""Train/test splits of molecules that honour the requested fraction, and say what they made.

A Bemis-Murcko scaffold split keeps every scaffold group on one side, so the test set holds
chemotypes the model never saw. Groups are indivisible: on data with a few large groups no
assignment may come near the requested test fraction (e.g. one group of acyclic molecules
holding half the set). `scaffold_split` then raises `SplitError` naming the sizes, instead
of returning a split of another size or of another kind; `describe_split` reports what a
split holds (sizes, positives per task, scaffold groups), for the log.
"""

import numpy as np

__all__ = ["SplitError", "scaffold_groups", "scaffold_split", "describe_split"]


class SplitError(ValueError):
    """No split of the requested kind reaches the requested fraction within the tolerance."""


def scaffold_groups(smiles):
    """{Bemis-Murcko scaffold SMILES: [indices]} ("" is the group of acyclic molecules)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold
    groups = {}
    for i, s in enumerate(smiles):
        key = MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)
        groups.setdefault(key, []).append(i)
    return groups


def scaffold_split(smiles, test_fraction=0.2, seed=0, tolerance=0.05):
    """Indices (train, test), sorted, with no Bemis-Murcko scaffold in both parts.

    Scaffold groups are taken in a seeded random order (``seed=None``: largest first, the
    MoleculeNet convention) and each goes to train while train stays within
    (1 - test_fraction) of the molecules, else to test. Raises `SplitError` when the test
    share differs from ``test_fraction`` by more than ``tolerance`` (absolute), e.g. when a
    large group does not fit in train and makes the test set most of the data.
    """
    if not 0 < test_fraction < 1:
        raise SplitError(f"test_fraction={test_fraction}: must lie in (0, 1)")
    groups = scaffold_groups(smiles)
    keys = sorted(groups)
    if seed is None:
        order = sorted(range(len(keys)), key=lambda k: (-len(groups[keys[k]]), keys[k]))
    else:
        order = np.random.default_rng(seed).permutation(len(keys))
    train, test, target = [], [], (1 - test_fraction) * len(smiles)
    for k in order:
        (train if len(train) + len(groups[keys[k]]) <= target else test).extend(groups[keys[k]])
    share = len(test) / len(smiles)
    if abs(share - test_fraction) > tolerance:
        largest = sorted((len(g) for g in groups.values()), reverse=True)[:5]
        raise SplitError(
            f"scaffold split (seed {seed}) of {len(smiles)} molecules in {len(groups)} scaffold "
            f"groups (largest: {largest}): {len(train)} train / {len(test)} test, a test share "
            f"of {share:.3f} for the requested {test_fraction} (tolerance {tolerance}); groups "
            "cannot be divided. Try another split seed, another test fraction, or a wider "
            "tolerance")
    return np.array(sorted(train), np.int64), np.array(sorted(test), np.int64)


def describe_split(labels, parts, smiles=None):
    """One line per part: size, share, positives per task (labels [n, T] in {0, 1}, NaN =
    missing) and, given ``smiles``, the number of scaffold groups. ``parts``: {name: indices}."""
    labels = np.asarray(labels, np.float64).reshape(len(labels), -1)
    total = sum(len(idx) for idx in parts.values())
    lines = []
    for name, idx in parts.items():
        part = labels[idx]
        known = np.sum(~np.isnan(part), axis=0)
        positive = np.nansum(part, axis=0)
        rates = ", ".join(f"{p / k:.0%}" if k else "-" for p, k in zip(positive, known))
        line = (f"{name}: {len(idx)} molecules ({len(idx) / total:.0%}), positives {rates}"
                if labels.shape[1] <= 3 else
                f"{name}: {len(idx)} molecules ({len(idx) / total:.0%}), mean positive rate "
                f"{np.nanmean(part):.0%} over {labels.shape[1]} tasks")
        if smiles is not None:
            line += f", {len(scaffold_groups([smiles[i] for i in idx]))} scaffold groups"
        lines.append(line)
    return lines
