"""A Graph Isomorphism Network in native Keras 3 (the pre-training-GNNs architecture).

Hu et al. (2019), "Strategies for Pre-training Graph Neural Networks": per layer l,

    h_v <- MLP_l( h_v + e_self^l + sum_{u -> v} (h_u + e_uv^l) )      (sum with self-loops)
    MLP_l = Dense(2H) -> BatchNorm -> ReLU -> Dense(H), then BatchNorm, ReLU (not after the
    last layer) and dropout;

node and edge inputs are sums of embeddings of categorical columns (atom type and chirality;
bond type and direction), edge embeddings are per layer, and the graph readout is the masked
mean over nodes, optionally concatenated with the centre node's embedding (ego-networks).
With ``warp_layers=True`` a warp layer follows every GIN layer: a linear map H -> H without
bias, initialised to the identity (named ``warp_<l>``; at its first value the encoder computes
exactly the plain GIN). WarpGrad meta-learns these as a preconditioner and adapts only the
other weights (`keras_metapt.taskmeta.WarpGrad`).
Input: a padded disjoint batch from `keras_metapt.data.graphs.batch_graphs`. Aggregation uses
`keras.ops.segment_sum` over static shapes, so it compiles with XLA.
Cost per layer: O(E H + N H^2).

Batch normalisation (training mode) takes its statistics over the real nodes only: the
padding slots of the batch (``node_mask`` false) are left out of the mean and variance, as
in the reference implementations, whose batches have no padding. The moving statistics
are updated from these masked moments.

BatchNorm momentum is 0.9 (moving = 0.9 moving + 0.1 batch), PyTorch's default 0.1 as the
reference implementations use it; Keras' default 0.99 would leave most of the moving
statistics at their initial 0/1 after a short warm-up.
"""

import keras
from keras import ops

__all__ = ["GIN"]


@keras.saving.register_keras_serializable(package="keras_metapt")
class GIN(keras.Model):
    """GIN encoder: padded graph batch -> [num_graphs, H] (or [num_graphs, 2H] with centre).

    Args:
      node_vocab_sizes: one vocabulary size per categorical node feature column.
      edge_vocab_sizes: one vocabulary size per categorical edge feature column.
      num_layers, hidden, dropout: sizes (paper: 5, 300, 0.2 or 0.5).
      readout: "mean" or "mean+center".
      bn_momentum: BatchNorm momentum (Keras convention; 0.9 = PyTorch's 0.1).
      num_graphs: graphs per batch (static, for XLA) when a batch has no "center" entry; a
        batch with one (`batch_graphs` output) may hold any static number of graphs.
      warp_layers: an identity-initialised linear warp layer after every GIN layer.
      seed: None: the weights and dropout masks are drawn from Keras' global seed
        (`keras.utils.set_random_seed`); an integer: every random initializer and the dropout
        layer get their own seeds derived from it, so the draw repeats without touching any
        global random state.
    """

    def __init__(self, node_vocab_sizes, edge_vocab_sizes, num_graphs, num_layers=5, hidden=300,
                 dropout=0.2, readout="mean", bn_momentum=0.9, warp_layers=False, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.seed = None if seed is None else int(seed)
        draws = iter(range(1 << 20))

        def next_seed():  # the next weight's seed (None: the global seed)
            return None if self.seed is None else (
                (self.seed * 1_000_003 + next(draws)) % (2 ** 31 - 1))

        def uniform():  # Keras' Embedding default, "uniform"
            return keras.initializers.RandomUniform(-0.05, 0.05, seed=next_seed())

        def dense(units):
            return keras.layers.Dense(units, kernel_initializer=keras.initializers.GlorotUniform(
                seed=next_seed()))

        if readout not in ("mean", "mean+center"):
            raise ValueError(f"readout must be 'mean' or 'mean+center', got {readout!r}")
        self.node_vocab_sizes = [int(v) for v in node_vocab_sizes]
        self.edge_vocab_sizes = [int(v) for v in edge_vocab_sizes]
        self.num_graphs = int(num_graphs)
        self.num_layers = int(num_layers)
        self.hidden = int(hidden)
        self.dropout_rate = float(dropout)
        self.readout = readout
        self.bn_momentum = float(bn_momentum)
        self.node_embeddings = [keras.layers.Embedding(v, hidden, embeddings_initializer=uniform(),
                                                       name=f"node_embedding_{i}")
                                for i, v in enumerate(self.node_vocab_sizes)]
        self.edge_embeddings = [[keras.layers.Embedding(v, hidden, embeddings_initializer=uniform(),
                                                        name=f"edge_embedding_{l}_{i}")
                                 for i, v in enumerate(self.edge_vocab_sizes)]
                                for l in range(num_layers)]
        # the self-loop edge's embedding, initialised like the embedding tables
        self.self_loops = [self.add_weight(shape=(hidden,), name=f"self_loop_{l}",
                                           initializer=uniform())
                           for l in range(num_layers)]
        self.mlps = [keras.Sequential([dense(2 * hidden),
                                       keras.layers.BatchNormalization(
                                           momentum=self.bn_momentum),
                                       keras.layers.ReLU(),
                                       dense(hidden)], name=f"gin_mlp_{l}")
                     for l in range(num_layers)]
        # call(mask=...) hands the node mask to the inner BatchNorm (Dense passes it on); the
        # flag only lets the Sequential return it instead of warning that it drops a mask
        for mlp in self.mlps:
            mlp.supports_masking = True
        self.norms = [keras.layers.BatchNormalization(momentum=self.bn_momentum,
                                                     name=f"gin_norm_{l}") for l in range(num_layers)]
        self.dropout = keras.layers.Dropout(dropout, seed=next_seed())
        self.warp_layers = bool(warp_layers)
        self.warps = [keras.layers.Dense(hidden, use_bias=False, kernel_initializer="identity",
                                         name=f"warp_{l}") for l in range(num_layers)
                      ] if self.warp_layers else []

    def _embed(self, tables, features):
        return sum(table(features[:, i]) for i, table in enumerate(tables))

    def call(self, batch, training=False):
        real_nodes = ops.cast(batch["node_mask"], "bool")  # BatchNorm's statistics: these only
        node_mask = ops.cast(batch["node_mask"], self.compute_dtype)[:, None]  # mixed precision
        edge_mask = ops.cast(batch["edge_mask"], self.compute_dtype)[:, None]
        source, target = batch["edge_index"][:, 0], batch["edge_index"][:, 1]
        num_nodes = ops.shape(batch["node_features"])[0]
        h = self._embed(self.node_embeddings, batch["node_features"]) * node_mask
        for l in range(self.num_layers):
            edges = self._embed(self.edge_embeddings[l], batch["edge_features"])
            messages = (ops.take(h, source, axis=0) + edges) * edge_mask
            aggregated = ops.segment_sum(messages, target, num_segments=num_nodes)
            self_loop = ops.cast(self.self_loops[l], h.dtype)  # (Keras' symbolic build: float32)
            h = self.mlps[l](h + self_loop + aggregated, training=training, mask=real_nodes)
            h = self.norms[l](h, training=training, mask=real_nodes)
            if l < self.num_layers - 1:
                h = ops.relu(h)
            h = self.dropout(h, training=training) * node_mask
            if self.warp_layers:
                h = self.warps[l](h)
        graph_ids = batch["node_graph"]
        # a batch's graph count is static in its "center" shape; num_graphs when it is not
        num_graphs = batch["center"].shape[0] if "center" in batch else None
        num_graphs = self.num_graphs if num_graphs is None else int(num_graphs)
        sums = ops.segment_sum(h * node_mask, graph_ids, num_segments=num_graphs + 1)
        counts = ops.segment_sum(node_mask, graph_ids, num_segments=num_graphs + 1)
        pooled = sums[:num_graphs] / ops.maximum(counts[:num_graphs], 1.0)
        if self.readout == "mean+center":
            pooled = ops.concatenate([pooled, ops.take(h, batch["center"], axis=0)], axis=-1)
        return pooled

    def get_config(self):
        config = super().get_config()
        config.update(node_vocab_sizes=self.node_vocab_sizes, edge_vocab_sizes=self.edge_vocab_sizes,
                      num_graphs=self.num_graphs, num_layers=self.num_layers, hidden=self.hidden,
                      dropout=self.dropout_rate, readout=self.readout,
                      bn_momentum=self.bn_momentum, warp_layers=self.warp_layers,
                      seed=self.seed)
        return config
