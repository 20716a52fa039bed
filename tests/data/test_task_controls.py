"""keras_metapt.data.task_controls and the task families of keras_metapt.data.embedded.

References: permutations checked column by column against the input (same multiset, same
NaN count, rows moved); the weight AUROC against scikit-learn's roc_auc_score; the task
labels against RDKit's own fragment functions, Morgan bit vectors and descriptor values
computed here independently.
"""

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import Descriptors, rdFingerprintGenerator
from sklearn.metrics import roc_auc_score

from keras_metapt.data import embedded
from keras_metapt.data.task_controls import permute_task_labels, weight_auroc


def test_permuted_tasks_keep_their_label_multiset_and_lose_the_rows():
    rng = np.random.default_rng(3)
    labels = (rng.random((200, 40)) < 0.3).astype(np.float32)
    labels[rng.random((200, 40)) < 0.1] = np.nan
    out, is_real = permute_task_labels(labels, 0.25, seed=7)
    assert is_real.sum() == 30 and (~is_real).sum() == 10
    same = np.isclose(out, labels, equal_nan=True).all(axis=0)
    assert same[is_real].all()          # real tasks untouched
    assert not same[~is_real].any()     # every control task moved
    for t in np.flatnonzero(~is_real):
        assert np.isnan(out[:, t]).sum() == np.isnan(labels[:, t]).sum()
        assert np.nansum(out[:, t]) == np.nansum(labels[:, t])
    again, again_real = permute_task_labels(labels, 0.25, seed=7)
    assert np.array_equal(again_real, is_real) and np.allclose(again, out, equal_nan=True)
    assert not np.array_equal(permute_task_labels(labels, 0.25, seed=8)[1], is_real)


def test_permute_refuses_bad_shapes_and_fractions():
    with pytest.raises(ValueError, match="examples, tasks"):
        permute_task_labels(np.zeros(5), 0.2, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        permute_task_labels(np.zeros((5, 3)), 1.5, 0)
    assert permute_task_labels(np.zeros((5, 3)), 0.0, 0)[1].all()


def test_weight_auroc_is_the_roc_auc_of_the_weights_for_real_tasks():
    rng = np.random.default_rng(0)
    is_real = rng.random(300) < 0.7
    weights = np.round(rng.normal(is_real * 0.5, 1.0), 1)  # rounded: ties occur
    assert weight_auroc(weights, is_real) == pytest.approx(roc_auc_score(is_real, weights))
    assert np.isnan(weight_auroc(weights, np.ones(300, bool)))


SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN(CC)CC", "O=C(O)c1ccccc1",
          "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "Clc1ccccc1", "CCOC(=O)C", "NCCc1ccccc1", "C1CCCCC1"]


def test_pretraining_tasks_are_rdkit_labels_with_the_rate_filter():
    labels, tasks = embedded.pretraining_tasks(SMILES, min_rate=0.1)
    assert labels.shape == (len(SMILES), len(tasks)) and set(np.unique(labels)) <= {0.0, 1.0}
    rates = labels.mean(0)
    assert ((rates >= 0.1) & (rates <= 0.9)).all()
    mols = [Chem.MolFromSmiles(s) for s in SMILES]
    families = [embedded.task_family(t) for t in tasks]
    assert set(families) == set(embedded.TASK_FAMILIES)
    fragment_fns = dict(Descriptors.descList)
    bits = np.array([rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
                     .GetFingerprintAsNumPy(m) for m in mols])
    for column, (task, family) in enumerate(zip(tasks, families)):
        if family == "fragment":
            expected = [fragment_fns[task](m) > 0 for m in mols]
        elif family == "morgan":
            expected = bits[:, int(task.split("_")[1])]
        else:
            name = task[len("desc_"):].split(">")[0]
            values = np.array([fragment_fns[name](m) for m in mols], np.float64)
            expected = values > np.median(values)
        np.testing.assert_array_equal(labels[:, column], np.asarray(expected, np.float32), task)


def test_pretraining_tasks_cache_and_bad_input(tmp_path):
    cache = str(tmp_path / "tasks.npz")
    first = embedded.pretraining_tasks(SMILES, ("fragment",), 0.1, cache=cache)
    second = embedded.pretraining_tasks(SMILES, ("fragment",), 0.1, cache=cache)
    assert first[1] == second[1] and np.array_equal(first[0], second[0])
    other = embedded.pretraining_tasks(SMILES, ("morgan",), 0.1, cache=cache)  # key differs
    assert all(embedded.task_family(t) == "morgan" for t in other[1])
    with pytest.raises(ValueError, match="families"):
        embedded.pretraining_tasks(SMILES, ("bogus",))
    with pytest.raises(ValueError, match="invalid SMILES"):
        embedded.pretraining_tasks(["CCO", "not a smiles"], ("fragment",))
    with pytest.raises(ValueError, match="not a pretraining_tasks name"):
        embedded.task_family("x_1")
