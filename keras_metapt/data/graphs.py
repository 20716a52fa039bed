"""Padded disjoint graph batches: static shapes, so batches compile under XLA without retracing.

A graph is a dict of NumPy arrays:
    node_features [n, F_n] int   categorical node features (e.g. atom type, chirality)
    edge_index    [e, 2]   int   (source, target) node indices; both directions listed
    edge_features [e, F_e] int   categorical edge features (e.g. bond type, direction)

`batch_graphs` packs graphs into one disjoint graph padded to bucket sizes:
    node_features [N, F_n], node_graph [N] (graph id; padding nodes point at graph B),
    node_mask [N], edge_index [E, 2] (into the packed nodes; padding edges 0 -> 0),
    edge_features [E, F_e], edge_mask [E], center [B] (a node per graph, default its first)
with N and E the smallest bucket sizes that fit, so only a few shapes ever reach XLA.
"""

import numpy as np

__all__ = ["batch_graphs", "bucket_size", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = tuple(2 ** k for k in range(5, 17))  # 32 .. 65536


def bucket_size(count, buckets=DEFAULT_BUCKETS):
    """The smallest bucket >= count."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"{count} exceeds the largest bucket {buckets[-1]}; pass larger buckets")


def batch_graphs(graphs, node_buckets=DEFAULT_BUCKETS, edge_buckets=DEFAULT_BUCKETS, centers=None):
    """Packs ``graphs`` (a list of graph dicts) into one padded disjoint batch (dict of arrays)."""
    if not graphs:
        raise ValueError("batch_graphs needs at least one graph")
    num_graphs = len(graphs)
    n_nodes = [len(g["node_features"]) for g in graphs]
    n_edges = [len(g["edge_index"]) for g in graphs]
    for i, n in enumerate(n_nodes):
        if n == 0:
            raise ValueError(f"graph {i} has no nodes")
    N = bucket_size(sum(n_nodes), node_buckets)
    E = bucket_size(max(sum(n_edges), 1), edge_buckets)
    f_n = graphs[0]["node_features"].shape[1]
    f_e = graphs[0]["edge_features"].shape[1]
    node_features = np.zeros((N, f_n), np.int32)
    node_graph = np.full(N, num_graphs, np.int32)
    node_mask = np.zeros(N, np.float32)
    edge_index = np.zeros((E, 2), np.int32)
    edge_features = np.zeros((E, f_e), np.int32)
    edge_mask = np.zeros(E, np.float32)
    center = np.zeros(num_graphs, np.int32)
    node_at = edge_at = 0
    for i, g in enumerate(graphs):
        n, e = n_nodes[i], n_edges[i]
        node_features[node_at:node_at + n] = g["node_features"]
        node_graph[node_at:node_at + n] = i
        node_mask[node_at:node_at + n] = 1.0
        if e:
            if g["edge_index"].max() >= n or g["edge_index"].min() < 0:
                raise ValueError(f"graph {i}: edge_index refers to a node outside 0..{n - 1}")
            edge_index[edge_at:edge_at + e] = g["edge_index"] + node_at
            edge_features[edge_at:edge_at + e] = g["edge_features"]
            edge_mask[edge_at:edge_at + e] = 1.0
        center[i] = node_at + (0 if centers is None else int(centers[i]))
        node_at += n
        edge_at += e
    return {"node_features": node_features, "node_graph": node_graph, "node_mask": node_mask,
            "edge_index": edge_index, "edge_features": edge_features, "edge_mask": edge_mask,
            "center": center}
