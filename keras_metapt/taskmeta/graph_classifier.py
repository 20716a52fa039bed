"""The task learner of the molecule family: a GIN encoder and a linear head, as pure functions.

`GINTaskModel` builds one `keras_metapt.nets.GIN` (no dropout; with ``warp_layers`` an
identity-initialised linear warp after every GIN layer) and applies it statelessly
(`keras_metapt.functional.stateless_apply`), so its weights are an explicit nest:

    params = [the encoder's trainable weights, warps excepted] + [W (H x K), b (K)]
    warp_params = [one H x H warp kernel per GIN layer]          (WarpGrad's omega)

The head starts at zero (every adapted model starts from p = 0.5). Batch normalisation uses
the statistics of the batch it is applied to, the support set while adapting and the query
set when testing (the transductive setting of the image learner); running statistics are
never used or updated. The batch statistics run over the real atoms of the set only: a set
of n graphs has n * max_nodes node slots (`pack_graph_sets`), and the padding slots (about
38% for sets of RDKit's shipped molecules at 32 slots each) are left out (`nets.GIN`).

A batch is (graphs, labels): graphs a padded disjoint batch (`pack_graph_sets`, one entry of
its leading set dimension), labels [B] in {0, 1} for one task (K = 1) or [B, K] for K tasks at
once (multitask pre-training). The loss is the mean binary cross-entropy over the labels.
Cost: one GIN forward, O(E H + N H^2) per layer.
"""

import numpy as np
import tensorflow as tf

from keras_metapt import functional
from keras_metapt.data.graphs import batch_graphs
from keras_metapt.data.molecules import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES
from keras_metapt.nets.gin import GIN

__all__ = ["GINTaskModel", "pack_graph_sets", "binary_auroc"]


def pack_graph_sets(graphs, rows, max_nodes, max_edges):
    """Sets of graphs as one nest with a leading set dimension: ``rows`` [M, n] indices into
    ``graphs`` -> dict of arrays [M, ...] (`batch_graphs` per set, padded to n * max_nodes
    nodes and n * max_edges edges, so every set of n graphs has the same static shape)."""
    rows = np.asarray(rows)
    n = rows.shape[1]
    sets = [batch_graphs([graphs[i] for i in r], node_buckets=(n * int(max_nodes),),
                         edge_buckets=(n * int(max_edges),)) for r in rows]
    return {key: np.stack([s[key] for s in sets]) for key in sets[0]}


def binary_auroc(scores, labels):
    """Area under the ROC curve of ``scores`` for binary ``labels`` (scikit-learn)."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


class GINTaskModel:
    """A GIN + linear head task learner (see the module docstring).

    Args:
      num_layers, hidden: the GIN's depth and width H.
      num_outputs: K, the head's logits (1: one binary task).
      warp_layers: build the warped encoder (WarpGrad).
      seed: the seed of the encoder's draw (`GIN(seed=...)`); no global random state is
        read or changed.
    """

    def __init__(self, *, num_layers=3, hidden=64, num_outputs=1, warp_layers=False, seed=0):
        if min(int(num_layers), int(hidden), int(num_outputs)) < 1:
            raise ValueError(f"num_layers, hidden and num_outputs must be >= 1, got "
                             f"{num_layers}, {hidden}, {num_outputs}")
        self.encoder = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=1,
                           num_layers=num_layers, hidden=hidden, dropout=0.0,
                           warp_layers=warp_layers, seed=int(seed))
        one_atom = {"node_features": np.zeros((1, 2), np.int32),
                    "edge_index": np.zeros((0, 2), np.int32),
                    "edge_features": np.zeros((0, 2), np.int32)}
        self.encoder(batch_graphs([one_atom]))
        self.hidden, self.num_outputs = int(hidden), int(num_outputs)
        variables = self.encoder.trainable_variables
        self._is_warp = ["/warp_" in v.path or v.path.startswith("warp_") for v in variables]
        trainable, self._state = functional.model_state(self.encoder)
        self._task_weights = [x.numpy() for x, w in zip(trainable, self._is_warp) if not w]
        self._warp_weights = [x.numpy() for x, w in zip(trainable, self._is_warp) if w]

    def initial_params(self):
        """params' first value: the drawn encoder weights and a zero [H, K], [K] head."""
        return [x.copy() for x in self._task_weights] + [
            np.zeros((self.hidden, self.num_outputs), np.float32),
            np.zeros(self.num_outputs, np.float32)]

    def initial_warp_params(self):
        """omega's first value: identity H x H kernels (empty without warp layers)."""
        return [x.copy() for x in self._warp_weights]

    def features(self, params, graphs, warp_params=None):
        """[B, H] graph embeddings of the encoder weights ``params[:-2]``."""
        warp_params = list(warp_params or [])
        if (len(params) - 2, len(warp_params)) != (len(self._task_weights),
                                                   len(self._warp_weights)):
            raise ValueError(f"expected {len(self._task_weights)} encoder weights, a head and "
                             f"{len(self._warp_weights)} warp kernels; got {len(params) - 2}, "
                             f"a head and {len(warp_params)}")
        task, warps = iter(params[:-2]), iter(warp_params)
        trainable = [next(warps) if w else next(task) for w in self._is_warp]
        outputs, _ = functional.stateless_apply(self.encoder, trainable, self._state, graphs,
                                                training=True)
        return outputs

    def logits(self, params, graphs, warp_params=None):
        """[B, K] logits."""
        return tf.matmul(self.features(params, graphs, warp_params), params[-2]) + params[-1]

    def loss(self, params, batch):
        """Mean binary cross-entropy of ``batch`` = (graphs, labels [B] or [B, K])."""
        return self.warped_loss(params, None, batch)

    def warped_loss(self, params, warp_params, batch):
        """`loss` with the warp kernels ``warp_params`` (WarpGrad's learner)."""
        graphs, labels = batch
        logits = self.logits(params, graphs, warp_params)
        labels = tf.reshape(tf.cast(labels, logits.dtype), tf.shape(logits))
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
