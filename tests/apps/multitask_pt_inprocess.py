"""In-process checks of apps/multitask_pt.py, run by tests/apps/test_multitask_pt.py in a
subprocess: importing the app defines its absl flags, which would clash with other modules'
flags in the test process.

References: scipy.stats.ttest_1samp (each task's mean hypergradient against 0, two-sided),
sklearn's roc_auc_score, and one real update of `TaskWeights` by a Keras optimizer (which
way a weight moves for a given sign of its hypergradient), on hypergradients given to the
check by a stand-in model.
"""

import types

import keras
import numpy as np
import tensorflow as tf
from scipy import stats
from sklearn.metrics import roc_auc_score

from apps import multitask_pt
from keras_metapt.hyper import TaskWeights


class GivenHypergradients:
    """A stand-in for MetaPretrainer whose hypergradient on an element is the element."""

    def hypergradient(self, element):
        return types.SimpleNamespace(hypergrad=(element,))


def columns_with_t(t_values, n=4, seed=0):
    """[n, tasks] float64 whose column k has the one-sample t statistic t_values[k]."""
    z = np.random.default_rng(seed).normal(size=(n, len(t_values)))
    z = (z - z.mean(0)) / z.std(0, ddof=1)  # mean 0, sample std 1
    scale = np.linspace(0.5, 2.0, len(t_values))  # a different spread per task
    return np.asarray(t_values) * scale / np.sqrt(n) + scale * z


def test_signal_of_each_task_is_its_t_test_against_zero():
    # n = 4 (3 degrees of freedom, cutoff 3.182): |t| 3.10 fails and 3.25 passes, so a test
    # with other degrees of freedom, a normal cutoff or another std would sort them otherwise
    real_t = [-3.25, -3.25, -3.25, -3.25, 3.25, 3.10, -3.10, 0.4, -1.0, 2.0, -0.2, 3.10]
    permuted_t = [3.11, -3.12, 0.5, -0.6, -3.27, 1.2, -2.1, 0.1]  # no ties with real_t
    is_real = np.array([True] * len(real_t) + [False] * len(permuted_t))
    grads = columns_with_t(real_t + permuted_t)
    assert np.allclose(stats.ttest_1samp(grads, 0.0).statistic, real_t + permuted_t)
    stream = tf.data.Dataset.from_tensor_slices(grads)
    out = multitask_pt.hypergradient_agreement(GivenHypergradients(), stream, 4, is_real)

    significant = stats.ttest_1samp(grads, 0.0).pvalue < 0.05
    mean, t = grads.mean(0), stats.ttest_1samp(grads, 0.0).statistic
    assert out["real_significant_share"] == significant[is_real].mean() == 5 / 12
    assert out["permuted_significant_share"] == significant[~is_real].mean() == 1 / 8
    assert out["real_significant_raised_share"] == (mean[significant & is_real] < 0).mean() == 0.8
    assert np.isclose(out["expected_direction_auroc_real"], roc_auc_score(is_real, -t),
                      rtol=0, atol=1e-12)
    assert np.isclose(out["expected_size_auroc_real"], roc_auc_score(is_real, np.abs(t)),
                      rtol=0, atol=1e-12)
    assert np.allclose(out["task_mean"], mean) and np.allclose(out["task_t"], t)
    assert out["batches"] == 4 and "significant_weight_follows_share" not in out
    # without is_real, or with fewer than 3 batches, there are no t tests
    assert "real_significant_share" not in multitask_pt.hypergradient_agreement(
        GivenHypergradients(), stream, 4)
    assert "real_significant_share" not in multitask_pt.hypergradient_agreement(
        GivenHypergradients(), stream, 2, is_real)


def test_a_negative_mean_hypergradient_raises_the_weight():
    """"Raised" as the meta arm's update makes it: a Keras optimizer descends the
    hypergradient of TaskWeights' logits, and the weights of the tasks with a negative mean
    end above 1 (the others below): the weights then follow -mean on every tested task."""
    t_values = [-3.25, 3.25, -3.25, 3.25, 0.3, -3.25]
    is_real = np.array([True, True, True, False, False, False])
    grads = columns_with_t(t_values, seed=1)
    weights = TaskWeights(len(t_values))
    weights.build(None)
    keras.optimizers.SGD(0.5).apply([tf.constant(grads.mean(0), tf.float32)],
                                    weights.trainable_variables)
    learned = weights.task_weights()
    assert np.array_equal(learned > 1.0, grads.mean(0) < 0)
    stream = tf.data.Dataset.from_tensor_slices(grads)
    follows = multitask_pt.hypergradient_agreement(GivenHypergradients(), stream, 4, is_real,
                                                   learned)
    assert follows["significant_weight_follows_share"] == 1.0
    against = multitask_pt.hypergradient_agreement(GivenHypergradients(), stream, 4, is_real,
                                                   2.0 - learned)
    assert against["significant_weight_follows_share"] == 0.0
    unmoved = multitask_pt.hypergradient_agreement(GivenHypergradients(), stream, 4, is_real,
                                                   np.ones(len(t_values)))
    assert "significant_weight_follows_share" not in unmoved  # weights at 1 say nothing
    assert follows["real_significant_raised_share"] == 2 / 3
