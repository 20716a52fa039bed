"""Label noise and the clean meta split.

References: the transition matrices written out by hand for C = 3 (uniform: (1 - r) I + r/C;
flip: (1 - r) I + r P with P the cyclic shift c -> c + 1); the empirical transition
frequencies of 200,000 corrupted labels against the matrix, within 5 binomial standard
errors; the meta split's counts per class and its disjointness checked with NumPy.
"""

import numpy as np
import pytest

from keras_metapt.data import corrupt_labels, noise_transition_matrix, split_clean_meta


def test_transition_matrices_written_out():
    np.testing.assert_allclose(noise_transition_matrix(0.3, "uniform", 3),
                               [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(noise_transition_matrix(0.3, "flip", 3),
                               [[0.7, 0.3, 0.0], [0.0, 0.7, 0.3], [0.3, 0.0, 0.7]])


@pytest.mark.parametrize("kind", ["uniform", "flip"])
def test_corrupted_labels_follow_the_transition_matrix(kind):
    classes, n, rate = 4, 200_000, 0.4
    labels = np.arange(n) % classes
    noisy, changed = corrupt_labels(labels, rate, kind, classes, seed=5)
    np.testing.assert_array_equal(changed, noisy != labels)
    matrix = noise_transition_matrix(rate, kind, classes)
    per_class = n // classes
    for true in range(classes):
        counts = np.bincount(noisy[labels == true], minlength=classes) / per_class
        se = np.sqrt(matrix[true] * (1 - matrix[true]) / per_class)
        assert np.all(np.abs(counts - matrix[true]) <= 5 * se + 1e-12), (true, counts)
    expected_wrong = rate * (classes - 1) / classes if kind == "uniform" else rate
    assert abs(changed.mean() - expected_wrong) < 0.01


def test_noise_is_fixed_by_its_seed_and_checks_its_inputs():
    labels = np.arange(100) % 10
    a, _ = corrupt_labels(labels, 0.5, "uniform", 10, seed=1)
    b, _ = corrupt_labels(labels, 0.5, "uniform", 10, seed=1)
    c, _ = corrupt_labels(labels, 0.5, "uniform", 10, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(corrupt_labels(labels, 0.0, "flip", 10, 0)[0], labels)
    with pytest.raises(ValueError, match="noise kind"):
        corrupt_labels(labels, 0.1, "pairs", 10, 0)
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(labels, 1.5, "flip", 10, 0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        corrupt_labels(labels, 0.1, "flip", 5, 0)


def test_clean_meta_split_is_class_balanced_and_disjoint():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    meta, rest = split_clean_meta(labels, 1003, 10, seed=4)
    counts = np.bincount(labels[meta], minlength=10)
    np.testing.assert_array_equal(counts, [101, 101, 101] + [100] * 7)
    assert len(np.intersect1d(meta, rest)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([meta, rest])), np.arange(5000))
    again, _ = split_clean_meta(labels, 1003, 10, seed=4)
    np.testing.assert_array_equal(meta, again)
    with pytest.raises(ValueError, match="class 1 has 0 examples"):
        split_clean_meta(np.zeros(50, int), 10, 10, seed=0)
