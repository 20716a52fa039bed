"""The molecule family's task learner (keras_metapt.taskmeta.GINTaskModel) and its graph sets.

References: the loss recomputed in float64 NumPy (binary cross-entropy of features @ W + b)
from the features of a separately built `nets.GIN` holding the same weights and called the
ordinary Keras way in training mode; with the zero head every logit is 0, so the loss is
exactly log 2; identity warp kernels leave the learner's function unchanged (the warped model
at omega's first value against the plain model of the same seed), and a warp kernel 2 I after
a layer equals that layer's output doubled; `pack_graph_sets` against `batch_graphs` of each
set; `MultitaskPretraining` steps on the multi-label pre-training head: the first loss
log 2, the encoder unmoved by the first step (the zero head passes it no gradient) and moved
by the second, the task head still zero.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.data import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, batch_graphs, smiles_to_graph
from keras_metapt.nets import GIN
from keras_metapt.taskmeta import GINTaskModel, MultitaskPretraining, pack_graph_sets

SMILES = ["C[C@H](N)C(=O)O", "c1ccccc1O", "CCO", "O=C(O)c1ccccc1OC(C)=O", "C/C=C/Cl",
          "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]
GRAPHS = [smiles_to_graph(s) for s in SMILES]
MAX_NODES = max(len(g["node_features"]) for g in GRAPHS)
MAX_EDGES = max(len(g["edge_index"]) for g in GRAPHS)


def one_set(rows):
    packed = pack_graph_sets(GRAPHS, np.array([rows]), MAX_NODES, MAX_EDGES)
    return {k: tf.constant(v[0]) for k, v in packed.items()}


def numpy_bce(logits, labels):
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))


def test_pack_graph_sets_is_batch_graphs_of_each_set_at_one_static_size():
    rows = np.array([[0, 1, 2], [3, 4, 5]])
    packed = pack_graph_sets(GRAPHS, rows, MAX_NODES, MAX_EDGES)
    assert packed["node_features"].shape == (2, 3 * MAX_NODES, 2)
    assert packed["edge_index"].shape == (2, 3 * MAX_EDGES, 2)
    for m, r in enumerate(rows):
        reference = batch_graphs([GRAPHS[i] for i in r], node_buckets=(3 * MAX_NODES,),
                                 edge_buckets=(3 * MAX_EDGES,))
        for key, value in reference.items():
            np.testing.assert_array_equal(packed[key][m], value)


def test_loss_is_the_binary_cross_entropy_of_the_keras_gin_and_head():
    model = GINTaskModel(num_layers=2, hidden=8, seed=3)
    params = model.initial_params()
    graphs, labels = one_set([0, 1, 2, 3]), np.array([0, 1, 1, 0])
    assert float(model.loss(params, (graphs, labels))) == pytest.approx(np.log(2), rel=1e-6)
    rng = np.random.default_rng(0)
    params[-2] = rng.standard_normal(params[-2].shape).astype(np.float32)
    params[-1] = rng.standard_normal(1).astype(np.float32)
    # an independent GIN with the same weights, called the ordinary Keras way
    reference = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=4, num_layers=2, hidden=8,
                    dropout=0.0)
    reference(graphs)
    for variable, value in zip(reference.trainable_variables, params[:-2]):
        variable.assign(value)
    features = reference(graphs, training=True).numpy().astype(np.float64)
    logits = features @ params[-2] + params[-1]
    assert float(model.loss(params, (graphs, labels))) == pytest.approx(
        numpy_bce(logits[:, 0], labels), rel=1e-5)
    # K outputs at once: labels [B, K], the mean over every label
    wide = GINTaskModel(num_layers=2, hidden=8, num_outputs=3, seed=3).initial_params()
    wide[-2] = rng.standard_normal((8, 3)).astype(np.float32)
    many = (rng.random((4, 3)) < 0.5).astype(np.float32)
    assert float(model.loss(params[:-2] + wide[-2:], (graphs, many))) == pytest.approx(
        numpy_bce(features @ wide[-2] + wide[-1], many), rel=1e-5)


def test_identity_warps_leave_the_learner_unchanged_and_a_warp_scales_its_layer():
    plain = GINTaskModel(num_layers=2, hidden=8, seed=5)
    warped = GINTaskModel(num_layers=2, hidden=8, warp_layers=True, seed=5)
    for a, b in zip(plain.initial_params(), warped.initial_params()):
        np.testing.assert_array_equal(a, b)  # the same seed draws the same task weights
    omega = warped.initial_warp_params()
    assert [w.shape for w in omega] == [(8, 8), (8, 8)]
    np.testing.assert_array_equal(omega[0], np.eye(8, dtype=np.float32))
    params = plain.initial_params()
    graphs = one_set([1, 3, 5])
    np.testing.assert_allclose(warped.features(params, graphs, omega),
                               plain.features(params, graphs), rtol=1e-6, atol=1e-6)
    # the last warp doubles the last layer's (linear) output; the mean readout is linear
    doubled = [omega[0], 2 * omega[1]]
    np.testing.assert_allclose(warped.features(params, graphs, doubled),
                               2 * plain.features(params, graphs), rtol=1e-5, atol=1e-6)
    with tf.GradientTape() as tape:
        omega_t = [tf.constant(w) for w in omega]
        tape.watch(omega_t)
        params[-2] = np.ones_like(params[-2])
        loss = warped.warped_loss(params, omega_t, (graphs, np.array([0, 1, 1])))
    assert all(float(tf.norm(g)) > 0 for g in tape.gradient(loss, omega_t))
    with pytest.raises(ValueError, match="and 2 warp kernels; got 24, a head and 1"):
        warped.features(params, graphs, omega[:1])


def test_the_seed_alone_fixes_the_draw_and_no_global_random_state_is_touched():
    """Reference: the weights of the same seed under two other global seeds (bit-equal), and
    the next draws of Keras', NumPy's and Python's global generators with and without a
    model built in between (equal)."""
    import random

    import keras

    def next_draws():
        return (float(keras.random.uniform(())), float(np.random.rand()), random.random())

    keras.utils.set_random_seed(11)
    first = GINTaskModel(num_layers=2, hidden=8, seed=7).initial_params()
    keras.utils.set_random_seed(12)
    without = next_draws()
    keras.utils.set_random_seed(12)
    again = GINTaskModel(num_layers=2, hidden=8, seed=7).initial_params()
    assert next_draws() == without
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other = GINTaskModel(num_layers=2, hidden=8, seed=8).initial_params()
    assert not np.array_equal(first[0], other[0])


def test_multitask_pretraining_on_pooled_graphs_with_a_multilabel_head():
    model = GINTaskModel(num_layers=1, hidden=8, seed=0)
    learner = MultitaskPretraining(model.initial_params(), 4, inner_steps=2,
                                   inner_learning_rate=0.1, optimizer=keras.optimizers.Adam(0.01),
                                   loss_fn=model.loss)
    rows = np.array([[0, 1, 2, 3, 4, 5]])
    graphs = {k: tf.constant(v) for k, v in
              pack_graph_sets(GRAPHS, rows, MAX_NODES, MAX_EDGES).items()}
    labels = tf.constant((np.random.default_rng(1).random((1, 6, 4)) < 0.5).astype(np.float32))
    before = [v.numpy() for v in learner.initialisation]
    metrics = learner.meta_step((graphs, labels))
    assert metrics["pretraining_loss"] == pytest.approx(np.log(2), rel=1e-6)
    after = learner.initial_values()
    # the zero head passes no gradient to the encoder on the first step; on the second it has
    np.testing.assert_array_equal(after[0], before[0])
    learner.meta_step((graphs, labels))
    after = learner.initial_values()
    assert any(not np.allclose(a, b) for a, b in zip(before[:-2], after[:-2]))
    np.testing.assert_array_equal(after[-2], 0)  # the task head stays zero
    assert tuple(learner.pretraining_head[0].shape) == (8, 4)
