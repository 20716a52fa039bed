"""SavedModels in TF Serving's layout, and meta-parameters in readable files.

TF Serving watches ``<base_dir>/<name>/`` and serves the highest numeric version directory:

    saved_models/
      my_model/
        1/  saved_model.pb  variables/  assets/  fingerprint.pb
        2/  ...

`export_saved_model` writes the next version (never overwriting one), first into a hidden
temporary directory that is renamed into place, so a server never sees a half-written
version. The ``serving_default`` signature has one named input and named outputs:

    inputs:  "<input_name>"  float tensor [batch, ...] as given by ``input_spec``
             (signals: [batch, time, channels]; tabular features: [batch, features]);
             or, for a dict ``input_spec``, one input per key. Graphs (`keras_metapt.nets.GIN`)
             take the padded disjoint batch of `keras_metapt.data.batch_graphs`:
             node_features [N, F_n] int32, node_graph [N] int32 (graph id; padding nodes
             carry the batch size), node_mask [N] float32, edge_index [E, 2] int32 (source,
             target into the packed nodes), edge_features [E, F_e] int32, edge_mask [E]
             float32, center [B] int32
    outputs: "<output_name>" the model's output, or one key per output of a dict-valued model

Point a server at it with
``tensorflow_model_server --model_name=my_model --model_base_path=$PWD/saved_models/my_model``.
"""

import json
import os
import re
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_metapt.errors import InputMismatchError

__all__ = ["next_version", "export_saved_model", "export_meta_parameters",
           "export_meta_pretrainer"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _versions(model_dir):
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def next_version(base_dir, name):
    """1 + the highest existing version under ``base_dir/name`` (1 for a new model)."""
    versions = _versions(os.path.join(base_dir, name))
    return versions[-1] + 1 if versions else 1


def _check_name(name):
    if not _NAME.match(name):
        raise InputMismatchError(
            f"model name {name!r} must start with a letter or digit and use only letters, "
            "digits, '_', '.' and '-' (it becomes a directory and a TF Serving model name)")


def export_saved_model(model, base_dir, name, input_spec, version=None, input_name="inputs",
                       output_name="outputs"):
    """Writes ``model`` as ``base_dir/name/<version>/`` with a ``serving_default`` signature.

    Args:
      model: a built Keras model or layer (called with training=False).
      input_spec: `tf.TensorSpec` of one input batch, e.g.
        ``tf.TensorSpec([None, 128], tf.float32)`` (its name is set to ``input_name``), or a
        dict of them for a model taking a dict (each key becomes a named input).
      version: an int to force a version number; it must not exist yet. Default: the next.
      input_name, output_name: signature keys (a dict-valued model keeps its own keys).
    Returns the path of the written version directory.
    """
    _check_name(name)
    model_dir = os.path.join(base_dir, name)
    if version is None:
        version = next_version(base_dir, name)
    version = int(version)
    if version < 1:
        raise InputMismatchError(f"version must be >= 1, got {version}")
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise InputMismatchError(f"{final} exists already; versions are never overwritten "
                                 f"(next free version: {next_version(base_dir, name)})")
    if isinstance(input_spec, dict):
        spec = {key: tf.TensorSpec(s.shape, s.dtype, name=key) for key, s in input_spec.items()}
    else:
        spec = tf.TensorSpec(input_spec.shape, input_spec.dtype, name=input_name)

    def serve(x):
        out = model(x, training=False)
        return dict(out) if isinstance(out, dict) else {output_name: out}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=[spec])
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-{version}")
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, final)
    return final


def export_meta_parameters(meta_layer, path, task_names=None):
    """Writes phi in readable form: ``path`` (JSON) and ``path`` with .npz (arrays).

    The JSON holds every trainable weight of the meta layer by name, and, for a layer with
    ``task_weights()`` (`TaskWeights`), the weights w_t with task names, sorted high to low.
    """
    weights = {v.path: np.asarray(v.numpy()) for v in meta_layer.trainable_variables}
    record = {"layer": meta_layer.name, "class": type(meta_layer).__name__,
              "weights": {k: v.tolist() for k, v in weights.items()}}
    if hasattr(meta_layer, "task_weights"):
        w = np.asarray(meta_layer.task_weights())
        names = task_names or getattr(meta_layer, "task_names", None) or [f"task_{i}" for i in range(len(w))]
        order = np.argsort(-w)
        record["task_weights"] = [{"task": names[i], "weight": float(w[i])} for i in order]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    np.savez(os.path.splitext(path)[0] + ".npz", **{k.replace("/", "__"): v for k, v in weights.items()})
    return path


def export_meta_pretrainer(model, base_dir, run_name, input_spec, version=None):
    """Exports a MetaPretrainer's pieces under ``base_dir``:

    ``<run>_encoder/<v>/`` (features), ``<run>_finetuned/<v>/`` (encoder + FT head),
    ``<run>_meta/<v>/`` (a SavedModel of the meta layer when it maps inputs, e.g. a learned
    augmentation) and ``<run>_meta_parameters.json`` / ``.npz``. Returns a dict of paths.
    """
    paths = {
        "encoder": export_saved_model(model.encoder, base_dir, f"{run_name}_encoder", input_spec,
                                      version, output_name="features"),
        "finetuned": export_saved_model(model, base_dir, f"{run_name}_finetuned", input_spec,
                                        version),
    }
    if model.meta_role == "inputs":
        paths["meta"] = export_saved_model(model.meta_layer, base_dir, f"{run_name}_meta",
                                           input_spec, version, output_name="augmented")
    paths["meta_parameters"] = export_meta_parameters(
        model.meta_layer, os.path.join(base_dir, f"{run_name}_meta_parameters.json"))
    return paths
