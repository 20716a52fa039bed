"""SavedModels in TF Serving layout.

References: the Keras model's own outputs on the same inputs (the reloaded SavedModel must
match them in a fresh process); the signature's own input spec for the PredictRequest.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import export
from tests import meta_pt_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELOAD = """
import sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
x = np.load(sys.argv[2])
out = fn(inputs=tf.constant(x))
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
print(sorted(fn.structured_input_signature[1]), sorted(fn.structured_outputs))
"""


def small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    model(np.random.default_rng(0).normal(size=(32, 6)).astype("float32"), training=True)
    return model


def test_reloaded_in_fresh_process_matches_keras(tmp_path):
    model = small_model()
    path = export.export_saved_model(model, str(tmp_path), "clf", tf.TensorSpec([None, 6], tf.float32))
    assert path == str(tmp_path / "clf" / "1")
    x = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", RELOAD, path, str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("['inputs'] ['outputs']")
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["outputs"],
                               model(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_a_mixed_precision_model_serves_float32(tmp_path):
    # Reference: the Keras model's own (bfloat16) output, cast to float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    path = export.export_saved_model(model, str(tmp_path), "clf", tf.TensorSpec([None, 6], tf.float32))
    x = np.random.default_rng(2).normal(size=(3, 6)).astype("float32")
    out = tf.saved_model.load(path).signatures["serving_default"](inputs=tf.constant(x))["outputs"]
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), tf.cast(model(x), tf.float32).numpy())


def test_versions_increment_and_never_overwrite(tmp_path):
    model = small_model()
    spec = tf.TensorSpec([None, 6], tf.float32)
    first = export.export_saved_model(model, str(tmp_path), "clf", spec)
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    second = export.export_saved_model(model, str(tmp_path), "clf", spec)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    with pytest.raises(km.InputMismatchError, match="never overwritten"):
        export.export_saved_model(model, str(tmp_path), "clf", spec, version=1)
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
    assert sorted(os.listdir(tmp_path / "clf")) == ["1", "2"]  # no temporary left behind
    with pytest.raises(km.InputMismatchError, match="model name"):
        export.export_saved_model(model, str(tmp_path), "../escape", spec)


def test_predict_request_from_signature_is_well_formed(tmp_path):
    from tensorflow_serving.apis import predict_pb2

    path = export.export_saved_model(small_model(), str(tmp_path), "clf",
                                     tf.TensorSpec([None, 6], tf.float32))
    signature = tf.saved_model.load(path).signatures["serving_default"]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "clf"
    request.model_spec.signature_name = "serving_default"
    x = np.zeros((2, 6), np.float32)
    for key, spec in signature.structured_input_signature[1].items():
        assert spec.shape.is_compatible_with(x.shape) and spec.dtype == tf.float32
        request.inputs[key].CopyFrom(tf.make_tensor_proto(x, dtype=spec.dtype))
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert list(parsed.inputs) == ["inputs"]
    np.testing.assert_array_equal(tf.make_ndarray(parsed.inputs["inputs"]), x)
    assert parsed.model_spec.signature_name == "serving_default"


def test_meta_pretrainer_export(tmp_path):
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=512)
    model = meta_pt_toy.build(0, y.shape[1])
    model.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=2, steps_per_epoch=5, verbose=0)
    paths = export.export_meta_pretrainer(model, str(tmp_path), "toy",
                                          tf.TensorSpec([None, 20], tf.float32))
    loaded = tf.saved_model.load(paths["finetuned"]).signatures["serving_default"]
    np.testing.assert_allclose(loaded(inputs=tf.constant(x_ft[:4]))["outputs"].numpy(),
                               model(x_ft[:4]).numpy(), rtol=1e-5, atol=1e-6)
    features = tf.saved_model.load(paths["encoder"]).signatures["serving_default"]
    assert features(inputs=tf.constant(x_ft[:4]))["features"].shape == (4, 4)
    record = json.load(open(paths["meta_parameters"]))
    weights = [t["weight"] for t in record["task_weights"]]
    assert weights == sorted(weights, reverse=True)
    np.testing.assert_allclose(sorted(weights, reverse=True),
                               np.sort(model.meta_layer.task_weights())[::-1], rtol=1e-6)
