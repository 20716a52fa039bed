"""Synthetic label noise and the clean meta set, as in the Meta-Weight-Net experiments.

- "uniform" (symmetric): with probability ``rate`` a label is replaced by a class drawn
  uniformly from all C classes (it may draw the true class), so the expected fraction of
  wrong labels is rate (C - 1) / C; the transition matrix is (1 - rate) I + rate / C.
- "flip" (pairwise): with probability ``rate`` class c becomes class (c + 1) mod C; the
  expected fraction of wrong labels is ``rate``.

`split_clean_meta` takes a class-balanced clean meta set out of the training split before the
noise is applied to the rest.
"""

import numpy as np

__all__ = ["NOISE_KINDS", "corrupt_labels", "noise_transition_matrix", "split_clean_meta"]

NOISE_KINDS = ("uniform", "flip")


def _check(rate, kind, num_classes):
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def noise_transition_matrix(rate, kind, num_classes):
    """T[i, j] = P(noisy label j | true label i)."""
    _check(rate, kind, num_classes)
    eye = np.eye(num_classes)
    if kind == "uniform":
        return (1.0 - rate) * eye + rate / num_classes
    return (1.0 - rate) * eye + rate * np.roll(eye, 1, axis=1)


def corrupt_labels(labels, rate, kind, num_classes, seed):
    """(noisy labels, mask of the labels that changed); labels are ints in [0, C)."""
    _check(rate, kind, num_classes)
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, "
                         f"{labels.max()}]")
    rng = np.random.default_rng(seed)
    chosen = rng.random(labels.shape) < rate
    if kind == "uniform":
        replacement = rng.integers(0, num_classes, labels.shape)
    else:
        replacement = (labels + 1) % num_classes
    noisy = np.where(chosen, replacement, labels).astype(labels.dtype)
    return noisy, noisy != labels


def split_clean_meta(labels, num_meta, num_classes, seed):
    """(meta indices, remaining indices): ``num_meta // C`` examples of every class (the
    remainder from the first classes), drawn without replacement by ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [num_meta // num_classes + (c < num_meta % num_classes)
                 for c in range(num_classes)]
    meta = []
    for c, count in enumerate(per_class):
        members = np.flatnonzero(labels == c)
        if len(members) < count:
            raise ValueError(f"class {c} has {len(members)} examples; the meta set needs {count}")
        meta.append(rng.choice(members, count, replace=False))
    meta = np.sort(np.concatenate(meta)) if meta else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(len(labels)), meta)
    return meta, rng.permutation(rest)
