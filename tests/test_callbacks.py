"""keras_metapt.callbacks: a MetaCheckpoint restores into a model built in another order
(Keras' auto-numbered layer names differ between the two builds); TaskWeightsHistory and
EpochTimer keep their epochs over a resume.

References: the saved model's own variable values, compared exactly after the restore; the
quantities recomputed from the weights and the stored seconds (each test states its own).
"""

import json

import keras
import numpy as np
import pytest

from keras_metapt.callbacks import EpochTimer, MetaCheckpoint
from tests import meta_pt_toy


def test_checkpoint_restores_when_keras_numbers_layers_differently(tmp_path):
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=256)
    saved = meta_pt_toy.build(0, y.shape[1])
    checkpoint = MetaCheckpoint(str(tmp_path / "ckpt"))
    saved.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1, steps_per_epoch=3, verbose=0,
              callbacks=[checkpoint])
    meta_pt_toy.build(1, y.shape[1])  # an earlier model in the process takes "dense", "dense_1"...
    restored = meta_pt_toy.build(2, y.shape[1])
    assert [v.path for v in restored.variables] != [v.path for v in saved.variables]
    assert checkpoint.restore(restored) == 1
    for (key, a), (key_b, b) in zip(saved.state_variables(), restored.state_variables()):
        assert key == key_b
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=key)


def test_task_weights_history_records_each_epoch_and_survives_a_resume(tmp_path):
    """TaskWeightsHistory: quantiles and AUROC recomputed here from the layer's weights with
    NumPy and scikit-learn; after a restart from the checkpoint of epoch 1 the file holds
    epochs 1-2 exactly once, equal to an uninterrupted run's."""
    from sklearn.metrics import roc_auc_score

    from keras_metapt.callbacks import TaskWeightsHistory, TaskWeightsPlot
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=256)
    is_real = np.arange(y.shape[1]) % 2 == 0

    def run(directory, epochs, model_seed=0):
        model = meta_pt_toy.build(model_seed, y.shape[1])
        history = TaskWeightsHistory(is_real, str(directory / "history.json"), verbose=False)
        plot = TaskWeightsPlot(str(directory / "weights.png"), groups=["a", "b"] * (y.shape[1] // 2)
                               + ["a"] * (y.shape[1] % 2), is_real=is_real)
        model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=epochs, steps_per_epoch=4,
                  verbose=0, callbacks=[history, MetaCheckpoint(str(directory / "ckpt")), plot])
        return model, history

    model, reference = run(tmp_path / "reference", 2)
    weights = model.meta_layer.task_weights()
    last = reference.epochs[-1]
    assert [e["epoch"] for e in reference.epochs] == [1, 2]
    assert last["quantiles"]["50"] == np.quantile(weights, 0.5)
    assert np.isclose(last["auroc_real"], roc_auc_score(is_real, weights), rtol=0, atol=1e-12)
    assert np.isclose(last["auroc_real_moved"], roc_auc_score(is_real, np.abs(weights - 1)),
                      rtol=0, atol=1e-12)
    assert (tmp_path / "reference" / "weights.png").stat().st_size > 1000
    run(tmp_path / "cut", 1)
    _, resumed = run(tmp_path / "cut", 2, model_seed=5)  # restored from epoch 1, then epoch 2
    assert resumed.epochs == reference.epochs


def test_epoch_timer_keeps_its_epochs_over_a_resume(tmp_path):
    """EpochTimer(path): reference: the throughput written out from the stored seconds
    (steps x batch / mean seconds of the epochs after ``skip`` that were not the first of
    their process). A run killed after epoch 2 and resumed from its checkpoint keeps epochs
    0-1, retimes epoch 2, times 3 (the resumed process's first epoch, 2, is left out); a run
    resumed after its last epoch runs none and reports the stored throughput."""
    x, y = np.zeros((32, 3), "float32"), np.zeros((32, 1), "float32")
    path = str(tmp_path / "timer" / "epoch_seconds.json")

    def fit(initial_epoch, epochs):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        timer = EpochTimer(path)
        model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                  callbacks=[timer])
        return timer

    fit(0, 3)
    first = json.load(open(path))
    assert [e["epoch"] for e in first] == [0, 1, 2]
    assert [e["first_in_process"] for e in first] == [True, False, False]
    timer = fit(2, 4)  # resumed at epoch 2
    stored = json.load(open(path))
    assert stored[:2] == first[:2] and [e["epoch"] for e in stored] == [0, 1, 2, 3]
    assert [e["first_in_process"] for e in stored] == [True, False, True, False]
    expected = 2 * 4 * 8 / (stored[1]["seconds"] + stored[3]["seconds"])
    assert timer.examples_per_second(4, 8, skip=1) == pytest.approx(expected)
    assert timer.seconds == [e["seconds"] for e in stored]
    done = fit(4, 4)  # nothing left to run
    assert done.examples_per_second(4, 8, skip=1) == pytest.approx(expected)
    assert np.isnan(EpochTimer().examples_per_second(4, 8))
