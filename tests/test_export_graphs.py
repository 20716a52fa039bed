"""Serving graph models: unpadded requests of any number of graphs of any sizes.

Reference: the Keras model applied to a full `batch_graphs` batch that starts with the graph
(row 0), one graph at a time, for every graph of a request; the reloaded signature must
return exactly one such row per graph, to float32 round-off.
"""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import export
from keras_metapt.data import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, batch_graphs, smiles_to_graph
from keras_metapt.nets import GIN
from tests.test_readme import readme

# 1 to 13 atoms; "C" and "[Na+].[Cl-]" have no bonds
SMILES = ["CCO", "C", "c1ccccc1O", "[Na+].[Cl-]", "O=C(O)c1ccccc1OC(C)=O", "C/C=C/Cl",
          "C[C@H](N)C(=O)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "N#N", "OCC(O)CO"]
NUM_GRAPHS = 6  # the models' static graphs per batch: 5 and 40 graphs need 1 and 7 chunks
SPEC = export.GraphRequestSpec(NUM_GRAPHS, NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES)


class Head(keras.Model):
    """GIN -> Dense(1), as the fine-tuned model of apps/multitask_pt.py."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.dense = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.dense(self.encoder(x, training=training))


def trained(model, graphs):
    # training-mode calls give BatchNorm non-trivial moving statistics
    for i in range(3):
        model(batch_graphs(graphs[i:i + NUM_GRAPHS]), training=True)
    return model


@pytest.fixture(scope="module")
def graphs():
    return [smiles_to_graph(s) for s in SMILES]


@pytest.fixture(scope="module")
def head(graphs):
    keras.utils.set_random_seed(0)
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=NUM_GRAPHS, num_layers=2, hidden=16)
    return trained(Head(gin), graphs)


@pytest.fixture(scope="module")
def served(head, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving") / "saved_models"
    path = export.export_graph_model(head, str(base), "multitask_pt_finetuned", SPEC)
    return path, tf.saved_model.load(path).signatures["serving_default"]


def call(signature, request):
    return signature(**{key: tf.constant(value) for key, value in request.items()})


def per_graph_reference(model, graphs):
    """Row 0 of the model on a full batch_graphs batch: the graph, then NUM_GRAPHS - 1 others."""
    filler = [smiles_to_graph("CC")] * (NUM_GRAPHS - 1)
    return np.stack([model(batch_graphs([g] + filler), training=False)[0].numpy()
                     for g in graphs])


@pytest.mark.parametrize("size", [1, 5, 40])
def test_requests_of_any_size_match_keras_per_graph(head, served, graphs, size):
    order = np.random.default_rng(size).integers(0, len(graphs), size)
    request = export.graph_request([graphs[i] for i in order])
    outputs = call(served[1], request)
    assert list(outputs) == ["outputs"]
    assert outputs["outputs"].shape == (size, 1)
    np.testing.assert_allclose(outputs["outputs"].numpy(),
                               per_graph_reference(head, graphs)[order], rtol=1e-5, atol=1e-5)


def test_encoder_with_centre_readout_through_export_saved_model(graphs, tmp_path):
    # the path apps take: export_saved_model with a GraphRequestSpec, output "features";
    # "mean+center" also checks each graph's first node as its centre, across chunks
    keras.utils.set_random_seed(1)
    gin = trained(GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=NUM_GRAPHS, num_layers=2,
                      hidden=8, readout="mean+center"), graphs)
    path = export.export_saved_model(gin, str(tmp_path), "encoder", SPEC, output_name="features")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    order = [9, 4, 1, 7, 0, 2, 3, 8]  # a full chunk of 6, then a partial one of 2
    features = call(signature, export.graph_request([graphs[i] for i in order]))["features"]
    assert features.shape == (8, 16)
    np.testing.assert_allclose(features.numpy(), per_graph_reference(gin, graphs)[order],
                               rtol=1e-5, atol=1e-5)


def test_signature_inputs_and_rest_body(served, graphs):
    signature = served[1]
    inputs = signature.structured_input_signature[1]
    assert {key: (spec.shape.as_list(), spec.dtype) for key, spec in inputs.items()} == {
        "node_features": ([None, 2], tf.int32), "num_nodes": ([None], tf.int32),
        "edge_index": ([None, 2], tf.int32), "edge_features": ([None, 2], tf.int32),
        "num_edges": ([None], tf.int32)}
    request = export.graph_request(graphs[:3])
    body = json.loads(json.dumps({"inputs": {k: v.tolist() for k, v in request.items()}}))
    from_json = {key: np.array(value, np.int32) for key, value in body["inputs"].items()}
    np.testing.assert_array_equal(call(signature, from_json)["outputs"].numpy(),
                                  call(signature, request)["outputs"].numpy())


def malformed(request, key, change):
    request = {k: v.copy() for k, v in request.items()}
    request[key] = change(request[key])
    return request


def set_at(index, value):
    def change(array):
        array[index] = value
        return array
    return change


@pytest.mark.parametrize("key, change, message", [
    ("edge_index", set_at((2, 1), 3), "edge_index: a node index lies outside"),  # CCO has 3 atoms
    ("edge_index", set_at((0, 0), -1), "edge_index: a node index lies outside"),
    ("num_nodes", set_at(0, 4), "num_nodes: must sum to the number of rows of node_features"),
    ("num_nodes", set_at(1, 0), "num_nodes: every graph needs at least one node"),
    ("num_nodes", lambda a: a[:0], "num_nodes: a request needs at least one graph"),
    ("num_edges", lambda a: a[:2], "num_edges: needs one entry per graph"),
    ("num_edges", set_at(0, 3), "num_edges: must sum to the number of rows of edge_index"),
    ("edge_features", lambda a: a[:-1], "edge_features: needs one row per row of edge_index"),
    ("node_features", set_at((0, 0), 119), r"node_features: column j must lie in 0 \.\. size_j"),
    ("edge_features", set_at((0, 1), 4), r"edge_features: column j must lie in 0 \.\. size_j"),
])
def test_malformed_request_names_the_input(served, graphs, key, change, message):
    request = malformed(export.graph_request(graphs[:3]), key, change)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(served[1], request)


class PooledOverGraphs(keras.Model):
    """One row per *batch* (the mean over its graphs): not a per-graph model."""

    def __init__(self, gin, **kwargs):
        super().__init__(**kwargs)
        self.gin = gin

    def call(self, batch, training=False):
        return keras.ops.mean(self.gin(batch, training=training), axis=0, keepdims=True)


def test_export_rejects_a_model_without_one_row_per_graph(tmp_path):
    keras.utils.set_random_seed(0)
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=2, num_layers=1, hidden=4)
    wrong = PooledOverGraphs(gin)
    wrong(batch_graphs([smiles_to_graph("CC"), smiles_to_graph("CCO")]))
    spec = export.GraphRequestSpec(3, NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES)
    with pytest.raises(km.InputMismatchError, match="one row per graph"):
        export.export_graph_model(wrong, str(tmp_path), "pooled", spec)


def test_readme_graph_serving_example(served, monkeypatch):
    section = readme().split("## Serving", 1)[1].split("\n## ", 1)[0]
    code = [block for block in re.findall(r"```python\n(.*?)```", section, re.S)
            if "graph_request" in block][0]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(served[0]))))
    scope = {}
    exec(code, scope)  # loads saved_models/multitask_pt_finetuned/1
    assert scope["outputs"].shape == (3, 1)
    rest = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    request = export.graph_request([smiles_to_graph(s) for s in ["CCO", "C"]])
    assert {k: np.array(v).tolist() for k, v in rest["inputs"].items()} == {
        k: v.tolist() for k, v in request.items()}
    assert json.loads(scope["body"])["inputs"].keys() == request.keys()

