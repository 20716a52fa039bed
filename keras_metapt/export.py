"""SavedModels in TF Serving's layout, and meta-parameters in readable files.

TF Serving watches ``<base_dir>/<name>/`` and serves the highest numeric version directory:

    saved_models/
      my_model/
        1/  saved_model.pb  variables/  assets/  fingerprint.pb
        2/  ...

`export_saved_model` writes the next version (never overwriting one), first into a hidden
temporary directory that is renamed into place, so a server never sees a half-written
version. The ``serving_default`` signature has named inputs and named outputs:

    inputs:  "<input_name>"  float tensor [batch, ...] as given by ``input_spec``
             (signals: [batch, time, channels]; tabular features: [batch, features]);
             or, for a dict ``input_spec``, one input per key.
    outputs: "<output_name>" the model's output, or one key per output of a dict-valued model

Graph models (a `GraphRequestSpec` as ``input_spec``, or `export_graph_model`) take an
unpadded request of any number G >= 1 of graphs of any sizes, the graphs concatenated:

    node_features [total_nodes, F_n] int32  categorical node features, graph after graph
    num_nodes     [G] int32                 nodes of each graph (>= 1)
    edge_index    [total_edges, 2] int32    (source, target), indices local to each graph
                                            (0 .. num_nodes[g] - 1), graph after graph
    edge_features [total_edges, F_e] int32  categorical edge features
    num_edges     [G] int32                 edges of each graph (>= 0)

and return exactly G rows. Each graph's centre (for a "mean+center" readout) is its first
node, as in `keras_metapt.data.batch_graphs`. `graph_request` builds this dict from graph
dicts (`keras_metapt.data.smiles_to_graph`).

Point a server at it with
``tensorflow_model_server --model_name=my_model --model_base_path=$PWD/saved_models/my_model``.
"""

import dataclasses
import json
import os
import re
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import functional
from keras_metapt.errors import InputMismatchError

__all__ = ["next_version", "export_saved_model", "GraphRequestSpec", "graph_request",
           "export_graph_model", "export_meta_parameters", "export_meta_pretrainer"]

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
        ``tf.TensorSpec([None, 128], tf.float32)`` (its name is set to ``input_name``), a
        dict of them for a model taking a dict (each key becomes a named input), or a
        `GraphRequestSpec` for a graph model (see `export_graph_model`; ``input_name`` unused).
      version: an int to force a version number; it must not exist yet. Default: the next.
      input_name, output_name: signature keys (a dict-valued model keeps its own keys).
    Returns the path of the written version directory.
    """
    if isinstance(input_spec, GraphRequestSpec):
        return export_graph_model(model, base_dir, name, input_spec, version, output_name)
    if isinstance(input_spec, dict):
        spec = {key: tf.TensorSpec(s.shape, s.dtype, name=key) for key, s in input_spec.items()}
    else:
        spec = tf.TensorSpec(input_spec.shape, input_spec.dtype, name=input_name)

    def serve(x):
        out = functional.full_precision(model(x, training=False))  # float32 under mixed policies
        return dict(out) if isinstance(out, dict) else {output_name: out}

    return _write(model, base_dir, name, version, serve, spec)


def _write(model, base_dir, name, version, serve, spec):
    """Writes ``serve`` (one argument of ``spec``) as the next (or given) version."""
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
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=[spec])
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-{version}")
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- graph models

@dataclasses.dataclass(frozen=True)
class GraphRequestSpec:
    """What a graph model's serving signature accepts (see the module docstring).

    Args:
      num_graphs: graphs per batch the model was built for (`keras_metapt.nets.GIN`'s
        static ``num_graphs``); a request is served in chunks of at most this many graphs.
      node_vocab_sizes, edge_vocab_sizes: vocabulary size of each categorical feature column
        (e.g. `keras_metapt.data.NODE_VOCAB_SIZES`); they fix F_n and F_e and the valid
        range 0 .. size - 1 of each column, checked per request.
    """

    num_graphs: int
    node_vocab_sizes: tuple
    edge_vocab_sizes: tuple

    def __post_init__(self):
        object.__setattr__(self, "num_graphs", int(self.num_graphs))
        object.__setattr__(self, "node_vocab_sizes", tuple(int(v) for v in self.node_vocab_sizes))
        object.__setattr__(self, "edge_vocab_sizes", tuple(int(v) for v in self.edge_vocab_sizes))
        if self.num_graphs < 1:
            raise InputMismatchError(f"num_graphs must be >= 1, got {self.num_graphs}")
        if not self.node_vocab_sizes or not self.edge_vocab_sizes:
            raise InputMismatchError("node_vocab_sizes and edge_vocab_sizes need one size per "
                                     "feature column")

    def signature(self):
        """The named `tf.TensorSpec`s of a request (the signature's inputs)."""
        f_n, f_e = len(self.node_vocab_sizes), len(self.edge_vocab_sizes)
        shapes = {"node_features": [None, f_n], "num_nodes": [None], "edge_index": [None, 2],
                  "edge_features": [None, f_e], "num_edges": [None]}
        return {key: tf.TensorSpec(shape, tf.int32, name=key) for key, shape in shapes.items()}

    def batch_signature(self):
        """The `tf.TensorSpec`s of one batch as the model takes it (any N and E)."""
        f_n, f_e = len(self.node_vocab_sizes), len(self.edge_vocab_sizes)
        return {"node_features": tf.TensorSpec([None, f_n], tf.int32),
                "node_graph": tf.TensorSpec([None], tf.int32),
                "node_mask": tf.TensorSpec([None], tf.float32),
                "edge_index": tf.TensorSpec([None, 2], tf.int32),
                "edge_features": tf.TensorSpec([None, f_e], tf.int32),
                "edge_mask": tf.TensorSpec([None], tf.float32),
                "center": tf.TensorSpec([self.num_graphs], tf.int32)}


def graph_request(graphs):
    """The serving request (dict of int32 arrays) of a list of graph dicts, in order."""
    if not graphs:
        raise InputMismatchError("a graph request needs at least one graph")
    f_n = np.shape(graphs[0]["node_features"])[1]
    f_e = np.shape(graphs[0]["edge_features"])[1]
    return {
        "node_features": np.concatenate(
            [np.reshape(g["node_features"], (-1, f_n)) for g in graphs]).astype(np.int32),
        "num_nodes": np.array([len(g["node_features"]) for g in graphs], np.int32),
        "edge_index": np.concatenate(
            [np.reshape(g["edge_index"], (-1, 2)) for g in graphs]).astype(np.int32),
        "edge_features": np.concatenate(
            [np.reshape(g["edge_features"], (-1, f_e)) for g in graphs]).astype(np.int32),
        "num_edges": np.array([len(g["edge_index"]) for g in graphs], np.int32),
    }


def _assert(condition, message):
    return tf.debugging.Assert(condition, [message])


def _checked_request(request, spec):
    """``request`` after in-graph checks whose failures name the offending input."""
    node_features, num_nodes = request["node_features"], request["num_nodes"]
    edge_index, edge_features = request["edge_index"], request["edge_features"]
    num_edges = request["num_edges"]
    graphs = tf.shape(num_nodes)[0]
    node_vocab = tf.constant(spec.node_vocab_sizes, tf.int32)
    edge_vocab = tf.constant(spec.edge_vocab_sizes, tf.int32)
    counts = [
        _assert(graphs >= 1, "num_nodes: a request needs at least one graph"),
        _assert(tf.shape(num_edges)[0] == graphs,
                "num_edges: needs one entry per graph (as many as num_nodes)"),
        _assert(tf.reduce_all(num_nodes >= 1), "num_nodes: every graph needs at least one node"),
        _assert(tf.reduce_all(num_edges >= 0), "num_edges: counts must be >= 0"),
        _assert(tf.reduce_sum(num_nodes) == tf.shape(node_features)[0],
                "num_nodes: must sum to the number of rows of node_features"),
        _assert(tf.reduce_sum(num_edges) == tf.shape(edge_index)[0],
                "num_edges: must sum to the number of rows of edge_index"),
        _assert(tf.shape(edge_features)[0] == tf.shape(edge_index)[0],
                "edge_features: needs one row per row of edge_index"),
        _assert(tf.reduce_all((node_features >= 0) & (node_features < node_vocab)),
                f"node_features: column j must lie in 0 .. size_j - 1 for the vocabulary sizes "
                f"{spec.node_vocab_sizes}"),
        _assert(tf.reduce_all((edge_features >= 0) & (edge_features < edge_vocab)),
                f"edge_features: column j must lie in 0 .. size_j - 1 for the vocabulary sizes "
                f"{spec.edge_vocab_sizes}"),
    ]
    with tf.control_dependencies(counts):
        edge_graph = tf.repeat(tf.range(graphs), num_edges)
        limit = tf.gather(num_nodes, edge_graph)[:, None]
        indices = _assert(tf.reduce_all((edge_index >= 0) & (edge_index < limit)),
                          "edge_index: a node index lies outside 0 .. num_nodes - 1 of its graph "
                          "(indices count from the first node of each graph)")
    with tf.control_dependencies(counts + [indices]):
        return {key: tf.identity(value) for key, value in request.items()}, edge_graph


def _output_specs(model, spec):
    """The model's output structure on one batch; each leaf must be [num_graphs, ...]."""
    traced = tf.function(lambda batch: functional.full_precision(model(batch, training=False))
                         ).get_concrete_function(
        spec.batch_signature())
    outputs = traced.structured_outputs
    for leaf in tf.nest.flatten(outputs):
        if leaf.shape.rank is None or leaf.shape.rank < 1 or leaf.shape[0] not in (
                None, spec.num_graphs):
            raise InputMismatchError(
                f"the model's output has shape {leaf.shape}; a graph model must return one row "
                f"per graph, [num_graphs={spec.num_graphs}, ...]")
    return outputs


def export_graph_model(model, base_dir, name, spec, version=None, output_name="outputs"):
    """Writes a graph model that serves unpadded requests of any number of graphs.

    The signature takes the request of the module docstring (``spec.signature()``) and returns
    one row per graph. Inside, the request is checked (a failure names the input), cut into
    chunks of ``spec.num_graphs`` graphs, and each chunk becomes the disjoint batch the model
    trained on (`keras_metapt.data.batch_graphs`' layout: node_graph 0..k-1, masks 1, edge
    indices into the chunk's nodes, each graph's first node as centre) at its exact node and
    edge counts, so no padding nodes or edges are added; the k < num_graphs rows of a last,
    partial chunk are kept and the rest dropped. Cost: ceil(G / num_graphs) model calls.

    Args:
      model: a built Keras graph model (e.g. `keras_metapt.nets.GIN`, or a head on one) whose
        outputs are [num_graphs, ...]; called with training=False.
      spec: a `GraphRequestSpec`.
      version, output_name: as in `export_saved_model`.
    Returns the path of the written version directory.
    """
    if not isinstance(spec, GraphRequestSpec):
        raise InputMismatchError(f"spec must be a GraphRequestSpec, got {type(spec).__name__}")
    outputs = _output_specs(model, spec)
    chunk_size = spec.num_graphs

    def serve(request):
        request, edge_graph = _checked_request(request, spec)
        num_nodes, num_edges = request["num_nodes"], request["num_edges"]
        graphs = tf.shape(num_nodes)[0]
        node_start = tf.concat([[0], tf.cumsum(num_nodes)], 0)
        edge_start = tf.concat([[0], tf.cumsum(num_edges)], 0)
        node_graph = tf.repeat(tf.range(graphs), num_nodes)
        # edge indices into the request's concatenated nodes
        edge_index = request["edge_index"] + tf.gather(node_start, edge_graph)[:, None]
        chunks = (graphs + chunk_size - 1) // chunk_size
        arrays = tf.nest.map_structure(
            lambda leaf: tf.TensorArray(leaf.dtype, size=chunks,
                                        element_shape=[chunk_size] + leaf.shape[1:].as_list()),
            outputs)

        def body(chunk, arrays):
            g0 = chunk * chunk_size
            g1 = tf.minimum(g0 + chunk_size, graphs)
            n0, n1 = node_start[g0], node_start[g1]
            e0, e1 = edge_start[g0], edge_start[g1]
            centers = node_start[g0:g1] - n0
            batch = {
                "node_features": request["node_features"][n0:n1],
                "node_graph": node_graph[n0:n1] - g0,
                "node_mask": tf.ones([n1 - n0], tf.float32),
                "edge_index": edge_index[e0:e1] - n0,
                "edge_features": request["edge_features"][e0:e1],
                "edge_mask": tf.ones([e1 - e0], tf.float32),
                "center": tf.pad(centers, [[0, chunk_size - (g1 - g0)]]),
            }
            out = functional.full_precision(model(batch, training=False))
            arrays = tf.nest.map_structure(
                lambda array, leaf: array.write(chunk, tf.ensure_shape(leaf, array.element_shape)),
                arrays, out)
            return chunk + 1, arrays

        _, arrays = tf.while_loop(lambda chunk, _: chunk < chunks, body, (0, arrays))
        out = tf.nest.map_structure(lambda array: array.concat()[:graphs], arrays)
        return dict(out) if isinstance(out, dict) else {output_name: out}

    return _write(model, base_dir, name, version, serve, spec.signature())


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
