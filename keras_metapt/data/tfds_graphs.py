"""Graph datasets as TFDS datasets, built offline from the user's files.

`write_graph_tfds` stores `GraphDataset` splits (from `read_molecule_csv`, `read_tudataset`,
`load_graphs_npz` or the embedded benchmark) with `tfds.dataset_builders.store_as_tfds_dataset`
under ``<data_dir>/<name>/<version>/``; `read_graph_tfds` loads a split back (any TFDS tool can
read the directory with ``tfds.builder_from_directory``). Features per example:
node_features [n, F_n] int32, edge_index [e, 2] int32, edge_features [e, F_e] int32,
labels [T] float32 (NaN = missing), index (the row in the source, to keep its order); the task
names are kept in ``task_names.json`` beside the dataset.
"""

import json
import os

import numpy as np

from keras_metapt.data.graph_files import GraphDataset

__all__ = ["write_graph_tfds", "read_graph_tfds"]


def _features(num_node_features, num_edge_features, num_tasks):
    import tensorflow_datasets as tfds
    return tfds.features.FeaturesDict({
        "node_features": tfds.features.Tensor(shape=(None, num_node_features), dtype=np.int32),
        "edge_index": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        "edge_features": tfds.features.Tensor(shape=(None, num_edge_features), dtype=np.int32),
        "labels": tfds.features.Tensor(shape=(num_tasks,), dtype=np.float32),
        "index": tfds.features.Scalar(dtype=np.int64),
    })


def write_graph_tfds(splits, name, data_dir, version="1.0.0"):
    """Writes {split_name: GraphDataset} as a TFDS dataset; returns its directory."""
    import tensorflow_datasets as tfds
    first = next(iter(splits.values()))
    g0 = first.graphs[0]
    features = _features(g0["node_features"].shape[1], g0["edge_features"].shape[1],
                         first.labels.shape[1])

    def examples(dataset):
        return [(i, {"node_features": g["node_features"].astype(np.int32),
                     "edge_index": g["edge_index"].astype(np.int32).reshape(-1, 2),
                     "edge_features": g["edge_features"].astype(np.int32),
                     "labels": dataset.labels[i].astype(np.float32), "index": i})
                for i, g in enumerate(dataset.graphs)]

    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=version, features=features, data_dir=data_dir,
        split_datasets={split: examples(ds) for split, ds in splits.items()})
    directory = os.path.join(data_dir, name, version)
    with open(os.path.join(directory, "task_names.json"), "w") as f:
        json.dump(list(first.task_names), f)
    return directory


def read_graph_tfds(directory, split, task_names=None):
    """Loads one split of a graph TFDS dataset (in source order) as a GraphDataset."""
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(directory)
    rows = sorted(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)),
                  key=lambda ex: int(ex["index"]))
    graphs = [{k: ex[k] for k in ("node_features", "edge_index", "edge_features")} for ex in rows]
    labels = np.stack([ex["labels"] for ex in rows]).astype(np.float32)
    stored = os.path.join(directory, "task_names.json")
    if task_names is None and os.path.exists(stored):
        with open(stored) as f:
            task_names = json.load(f)
    names = task_names or [f"task_{i}" for i in range(labels.shape[1])]
    return GraphDataset(graphs, labels, list(names), 0, f"{directory}:{split}")
