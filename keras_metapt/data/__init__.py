"""Data: graph batching and featurisation (loaders and TFDS builders build on these)."""

from keras_metapt.data.graph_files import (GraphDataset, GraphFileError, load_graphs_npz,
                                           read_molecule_csv, read_tudataset, save_graphs_npz)
from keras_metapt.data.graphs import batch_graphs, bucket_size
from keras_metapt.data.label_noise import (NOISE_KINDS, corrupt_labels, noise_transition_matrix,
                                           split_clean_meta)
from keras_metapt.data.molecules import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, smiles_to_graph

__all__ = ["batch_graphs", "bucket_size", "smiles_to_graph", "NODE_VOCAB_SIZES",
           "EDGE_VOCAB_SIZES", "GraphDataset", "GraphFileError", "read_molecule_csv",
           "read_tudataset", "save_graphs_npz", "load_graphs_npz", "NOISE_KINDS",
           "corrupt_labels", "noise_transition_matrix", "split_clean_meta"]
