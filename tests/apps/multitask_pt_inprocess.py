"""In-process checks of apps/multitask_pt.py, run by tests/apps/test_multitask_pt.py in a
subprocess: importing the app defines its absl flags, which would clash with other modules'
flags in the test process.

References: scipy.stats.ttest_1samp (each task's mean hypergradient against 0, two-sided) and
sklearn's roc_auc_score, on hypergradients given to the check by a stand-in model.
"""

import types

import numpy as np
import tensorflow as tf
from scipy import stats
from sklearn.metrics import roc_auc_score

from apps import multitask_pt


class GivenHypergradients:
    """A stand-in for MetaPretrainer whose hypergradient on an element is the element."""

    def hypergradient(self, element):
        return types.SimpleNamespace(hypergrad=(element,))


def test_signal_of_each_task_is_its_t_test_against_zero():
    rng = np.random.default_rng(0)
    count, tasks = 12, 40
    is_real = np.arange(tasks) % 4 != 0
    # real tasks: a mean of either sign (some clearly non-zero); controls: pure noise
    means = np.where(is_real, rng.normal(0.0, 1.0, tasks), 0.0)
    grads = (means + rng.normal(0.0, 1.0, (count, tasks))).astype(np.float32)
    stream = tf.data.Dataset.from_tensor_slices(grads)
    out = multitask_pt.hypergradient_agreement(GivenHypergradients(), stream, count, is_real)

    significant = stats.ttest_1samp(grads.astype(np.float64), 0.0).pvalue < 0.05
    mean = grads.astype(np.float64).mean(0)
    for name, mask in (("real", is_real), ("permuted", ~is_real)):
        assert out[f"{name}_significant_share"] == significant[mask].mean()
        assert out[f"{name}_raised_share"] == (mean[mask] < 0).mean()
    assert np.isclose(out["expected_direction_auroc_real"], roc_auc_score(is_real, -mean),
                      rtol=0, atol=1e-12)
    t = stats.ttest_1samp(grads.astype(np.float64), 0.0).statistic
    assert np.isclose(out["expected_size_auroc_real"], roc_auc_score(is_real, np.abs(t)),
                      rtol=0, atol=1e-12)
    assert 0.0 < out["real_significant_share"] and out["batches"] == count
    # without is_real, or with fewer than 3 batches, there are no t tests
    assert "real_significant_share" not in multitask_pt.hypergradient_agreement(
        GivenHypergradients(), stream, count)
    assert "real_significant_share" not in multitask_pt.hypergradient_agreement(
        GivenHypergradients(), stream, 2, is_real)
