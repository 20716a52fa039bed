"""Pins the private Keras 3 behaviour that MetaPretrainer and MetaCheckpoint rely on.

Each test fails loudly, naming the dependency, if a Keras release changes it. Reference: the
behaviour of keras 3.15's TensorFlow trainer, stated in each test.
"""

import inspect

import keras
import numpy as np
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

import keras_metapt as km


def test_make_function_wraps_a_step_function():
    # MetaPretrainer.make_train_function builds its two steps with Trainer._make_function.
    assert hasattr(TensorFlowTrainer, "_make_function"), \
        "keras removed TensorFlowTrainer._make_function (used by MetaPretrainer)"
    assert list(inspect.signature(TensorFlowTrainer._make_function).parameters) == \
        ["self", "step_function"]


def test_maybe_symbolic_build_signature_and_call_in_fit():
    # MetaPretrainer overrides _maybe_symbolic_build(iterator=None, data_batch=None) to skip it.
    assert list(inspect.signature(TensorFlowTrainer._maybe_symbolic_build).parameters) == \
        ["self", "iterator", "data_batch"]
    assert "self._maybe_symbolic_build(" in inspect.getsource(TensorFlowTrainer.fit)
    assert inspect.signature(km.MetaPretrainer._maybe_symbolic_build) == \
        inspect.signature(TensorFlowTrainer._maybe_symbolic_build)


def test_fit_starts_at_initial_epoch_set_in_on_train_begin():
    # MetaCheckpoint.on_train_begin sets model._initial_epoch (as BackupAndRestore does); fit
    # must then run only the remaining epochs.
    class SetInitialEpoch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model._initial_epoch = 2

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[SetInitialEpoch()])
    assert history.epoch == [2], "keras.Model.fit no longer honours _initial_epoch"


def test_optimizer_slots_read_by_mirror_keras():
    # optim.mirror_keras reads Adam's _momentums/_velocities, SGD's momentums and
    # _get_variable_index (the slot order of Keras 3 optimizers).
    variables = [keras.Variable(np.zeros(2)), keras.Variable(np.zeros(3))]
    adam, sgd = keras.optimizers.Adam(), keras.optimizers.SGD(momentum=0.9)
    adam.build(variables)
    sgd.build(variables)
    assert [adam._get_variable_index(v) for v in variables] == [0, 1]
    assert [tuple(m.shape) for m in adam._momentums] == [(2,), (3,)]
    assert [tuple(m.shape) for m in adam._velocities] == [(2,), (3,)]
    assert [tuple(m.shape) for m in sgd.momentums] == [(2,), (3,)]


def test_backend_moments_function_that_exact_batch_moments_replaces():
    # functional.exact_batch_moments swaps keras.src.backend.tensorflow.nn._compute_moments
    # (x, axes, keepdims), which the backend's moments() looks up at call time.
    from keras.src.backend.tensorflow import nn as keras_tf_nn
    assert list(inspect.signature(keras_tf_nn._compute_moments).parameters) == \
        ["x", "axes", "keepdims"]
    assert "_compute_moments(x, axes, keepdims)" in inspect.getsource(keras_tf_nn.moments)
