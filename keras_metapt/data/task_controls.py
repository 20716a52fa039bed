"""Control tasks with a known answer: PT tasks made useless by permuting their labels.

A permuted task keeps its label marginal (positive rate, missing labels) but loses every link
to the molecule, so a task-weighting method should learn to down-weight it. Knowing which tasks
are permuted turns "did the weights move the right way" into a number (`weight_auroc`).
"""

import numpy as np

__all__ = ["permute_task_labels", "weight_auroc"]


def permute_task_labels(labels, fraction, seed):
    """Permutes the labels of round(fraction * T) randomly chosen tasks across examples.

    Args:
      labels: [n, T] labels (any values; NaN = missing travels with its label).
      fraction: share of tasks to permute, in [0, 1].
      seed: the choice of tasks and each task's permutation (independent per task).
    Returns:
      (new labels [n, T], is_real [T] bool: False for the permuted tasks).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [examples, tasks], got shape {labels.shape}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    n, num_tasks = labels.shape
    rng = np.random.default_rng(seed)
    permuted = rng.choice(num_tasks, size=int(round(fraction * num_tasks)), replace=False)
    out = labels.copy()
    for t in np.sort(permuted):
        out[:, t] = labels[rng.permutation(n), t]
    is_real = np.ones(num_tasks, bool)
    is_real[permuted] = False
    return out, is_real


def weight_auroc(weights, is_real):
    """AUROC of task weights as a score for "task is real": the probability that a random real
    task outweighs a random permuted one (ties count 1/2). NaN when either group is empty."""
    weights, is_real = np.asarray(weights, np.float64), np.asarray(is_real, bool)
    real, fake = weights[is_real], weights[~is_real]
    if len(real) == 0 or len(fake) == 0:
        return float("nan")
    greater = (real[:, None] > fake[None, :]).sum()
    ties = (real[:, None] == fake[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(real) * len(fake)))
