"""GIN invariances and compilation.

References: the same graph's embedding under another node order, in another batch, or padded
to another bucket (exact symmetries of the architecture, so equal to float32 round-off).
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.data import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, batch_graphs, smiles_to_graph
from keras_metapt.nets import GIN

SMILES = ["C[C@H](N)C(=O)O", "c1ccccc1O", "CCO", "O=C(O)c1ccccc1OC(C)=O", "C/C=C/Cl"]


def model(num_graphs, readout="mean", layers=3):
    tf.keras.utils.set_random_seed(0)
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=num_graphs, num_layers=layers,
              hidden=32, dropout=0.3, readout=readout)
    # a few training-mode calls give BatchNorm non-trivial moving statistics
    batch = batch_graphs([smiles_to_graph(s) for s in SMILES[:num_graphs]]
                         + [smiles_to_graph("CC")] * max(0, num_graphs - len(SMILES)))
    for _ in range(3):
        gin(batch, training=True)
    return gin


def permuted(graph, perm):
    inverse = np.argsort(perm)
    return {"node_features": graph["node_features"][perm],
            "edge_index": inverse[graph["edge_index"]],
            "edge_features": graph["edge_features"]}


def test_invariant_to_node_permutation():
    gin = model(1, readout="mean")
    graph = smiles_to_graph(SMILES[3])
    perm = np.random.default_rng(0).permutation(len(graph["node_features"]))
    a = gin(batch_graphs([graph]), training=False).numpy()
    b = gin(batch_graphs([permuted(graph, perm)]), training=False).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_invariant_to_batch_composition_and_padding():
    gin3 = model(3)
    graphs = [smiles_to_graph(s) for s in SMILES]
    first = gin3(batch_graphs(graphs[:3]), training=False).numpy()
    other = gin3(batch_graphs([graphs[4], graphs[1], graphs[3]]), training=False).numpy()
    np.testing.assert_allclose(first[1], other[1], rtol=1e-5, atol=1e-6)  # same molecule
    padded = gin3(batch_graphs(graphs[:3], node_buckets=(256,), edge_buckets=(512,)),
                  training=False).numpy()
    np.testing.assert_allclose(first, padded, rtol=1e-5, atol=1e-6)


def test_a_batch_may_hold_another_number_of_graphs_than_num_graphs():
    """Reference: each molecule scored alone (a one-graph batch) by the same model; a batch of
    5 graphs and one of 1 graph both work on a model built with num_graphs=3."""
    gin3 = model(3)
    graphs = [smiles_to_graph(s) for s in SMILES]
    together = gin3(batch_graphs(graphs), training=False).numpy()
    assert together.shape == (5, 32)
    alone = np.concatenate([gin3(batch_graphs([g]), training=False).numpy() for g in graphs])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_center_readout_concatenates_the_centre_node():
    gin = model(2, readout="mean+center")
    out = gin(batch_graphs([smiles_to_graph(s) for s in SMILES[:2]], centers=[1, 0]), training=False)
    assert out.shape == (2, 64)


def test_xla_matches_and_compiles_once_per_bucket():
    gin = model(2)
    traces = []

    @tf.function(jit_compile=True)
    def embed(batch):
        traces.append(1)
        return gin(batch, training=False)

    graphs = [smiles_to_graph(s) for s in SMILES]
    for pair in ([0, 1], [2, 3], [4, 0]):  # all fit the 32-node bucket
        batch = batch_graphs([graphs[i] for i in pair])
        np.testing.assert_allclose(embed(batch).numpy(), gin(batch, training=False).numpy(),
                                   rtol=1e-4, atol=1e-5)
    assert len(traces) == 1


def test_gradients_reach_every_weight():
    gin = model(2)
    batch = batch_graphs([smiles_to_graph(s) for s in SMILES[:2]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(gin(batch, training=True) ** 2)
    grads = tape.gradient(loss, gin.trainable_variables)
    missing = [v.path for v, g in zip(gin.trainable_variables, grads) if g is None]
    assert not missing


def test_bad_arguments():
    with pytest.raises(ValueError, match="readout"):
        GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=1, readout="max")


def test_mixed_bfloat16_gin_matches_the_float32_one():
    # Reference: the float32 GIN with the same weights; bfloat16 has an 8-bit mantissa, so
    # the embeddings agree to about 1e-2 relative, not to float32 round-off.
    import keras
    graphs = batch_graphs([smiles_to_graph(s) for s in SMILES[:3]])
    reference = model(3)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=3, num_layers=3, hidden=32,
                    dropout=0.3)
        mixed(graphs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(reference.get_weights())
    assert all(v.dtype == "float32" for v in mixed.variables if "seed" not in v.path)
    want = reference(graphs, training=False).numpy()
    got = mixed(graphs, training=False)
    assert got.dtype == tf.bfloat16
    got = tf.cast(got, tf.float32).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03


def test_training_mode_embeddings_do_not_depend_on_the_padding():
    """Reference: the same graphs packed into a 32-slot and a 256-slot batch (an exact
    symmetry once batch statistics leave the padding out), in training mode, no dropout."""
    tf.keras.utils.set_random_seed(0)
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=3, num_layers=3, hidden=16,
              dropout=0.0)
    graphs = [smiles_to_graph(s) for s in SMILES[:3]]
    tight = gin(batch_graphs(graphs, node_buckets=(32,), edge_buckets=(64,)), training=True)
    loose = gin(batch_graphs(graphs, node_buckets=(256,), edge_buckets=(512,)), training=True)
    np.testing.assert_allclose(tight.numpy(), loose.numpy(), rtol=1e-4, atol=1e-5)
    # the masked moments compile with XLA too
    compiled = tf.function(lambda b: gin(b, training=True), jit_compile=True)
    loose_xla = compiled(batch_graphs(graphs, node_buckets=(256,), edge_buckets=(512,)))
    np.testing.assert_allclose(tight.numpy(), loose_xla.numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_statistics_are_those_of_the_real_nodes():
    """Reference: a float64 NumPy transcription of the first GIN layer up to its first
    BatchNorm (embedding sums, messages over edges, self-loop, Dense); after one training
    call from moving statistics (0, 1) with momentum 0.9 the moving mean must be
    0.1 * mean and the moving variance 0.9 + 0.1 * var (biased) over the real nodes."""
    tf.keras.utils.set_random_seed(1)
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=2, num_layers=1, hidden=8,
              dropout=0.0)
    batch = batch_graphs([smiles_to_graph(s) for s in SMILES[3:5]], node_buckets=(64,),
                         edge_buckets=(128,))
    gin(batch, training=True)
    real = batch["node_mask"] > 0
    assert (~real).sum() > real.sum() / 2  # plenty of padding, so the difference would show
    f64 = lambda v: np.asarray(v, np.float64)
    node_tables = [f64(e.embeddings) for e in gin.node_embeddings]
    edge_tables = [f64(e.embeddings) for e in gin.edge_embeddings[0]]
    h = sum(t[batch["node_features"][:, i]] for i, t in enumerate(node_tables)) * real[:, None]
    edges = sum(t[batch["edge_features"][:, i]] for i, t in enumerate(edge_tables))
    source, target = batch["edge_index"][:, 0], batch["edge_index"][:, 1]
    messages = (h[source] + edges) * batch["edge_mask"][:, None]
    aggregated = np.zeros_like(h)
    np.add.at(aggregated, target, messages)
    dense, norm = gin.mlps[0].layers[0], gin.mlps[0].layers[1]
    z = (h + f64(gin.self_loops[0]) + aggregated) @ f64(dense.kernel) + f64(dense.bias)
    np.testing.assert_allclose(f64(norm.moving_mean), 0.1 * z[real].mean(0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(f64(norm.moving_variance), 0.9 + 0.1 * z[real].var(0),
                               rtol=1e-4, atol=1e-6)
