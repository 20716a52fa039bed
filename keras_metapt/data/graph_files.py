"""Readers for graph datasets in the formats users have on disk.

* MoleculeNet-style CSV: a SMILES column and label columns; an empty cell is a missing label
  (NaN, masked in the loss). `read_molecule_csv`.
* TUDataset text format: ``<name>_A.txt`` (edges "i, j", 1-based node ids),
  ``<name>_graph_indicator.txt`` (graph id of each node, 1-based), ``<name>_graph_labels.txt``,
  optional ``<name>_node_labels.txt`` and ``<name>_edge_labels.txt``. `read_tudataset`.
* keras_metapt .npz (to which other graph sets, e.g. PPI ego-networks, can be exported):
  node_features [sum n, F_n] int32, node_offsets [G+1], edge_index [sum e, 2] int32 (indices
  local to each graph), edge_features [sum e, F_e] int32, edge_offsets [G+1], labels [G, T]
  float32 (NaN = missing), task_names [T] str, optional centers [G]. `save_graphs_npz`,
  `load_graphs_npz`.

Bad rows never become silent wrong labels: ``on_error="raise"`` (default) stops with an
error naming the file and row; ``on_error="skip"`` drops the row, counts it and warns.
Each reader returns a `GraphDataset`.
"""

import csv
import dataclasses
import os
import warnings
from typing import List, Optional

import numpy as np

from keras_metapt.data.molecules import InvalidSmilesError, smiles_to_graph

__all__ = ["GraphDataset", "GraphFileError", "read_molecule_csv", "read_tudataset",
           "save_graphs_npz", "load_graphs_npz"]


class GraphFileError(ValueError):
    """A graph file that cannot be read as declared (names the file and the row)."""


@dataclasses.dataclass
class GraphDataset:
    graphs: List[dict]
    labels: np.ndarray             # [G, T] float32, NaN = missing
    task_names: List[str]
    skipped: int = 0               # rows dropped with on_error="skip"
    source: str = ""
    centers: Optional[np.ndarray] = None
    smiles: Optional[List[str]] = None     # SMILES of the rows kept (CSV input)


def _check_on_error(on_error):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _parse_label(text, where, binary=False, allow_missing=True):
    text = text.strip()
    try:
        value = float(text) if text else np.nan
    except ValueError:
        raise GraphFileError(f"{where}: label {text!r} is not a number") from None
    if np.isnan(value):  # an empty cell, "nan" or "NaN": missing
        if not allow_missing:
            raise GraphFileError(f"{where}: the label is missing")
        return np.nan
    if np.isinf(value) or (binary and value not in (0.0, 1.0)):
        raise GraphFileError(f"{where}: label {text!r} is not "
                             + ("0 or 1 (a binary task)" if binary else "a finite number"))
    return value


def _utf8_lines(path, on_error):
    """(line number, text) of each line of ``path`` decoded as UTF-8 (a BOM is dropped); a
    line that is not UTF-8 raises `GraphFileError` naming the file, line and byte, or with
    ``on_error="skip"`` is left out (counted in the second return value)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines, skipped = [], 0
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append((number, line.decode("utf-8")))
        except UnicodeDecodeError as e:
            if on_error == "raise":
                raise GraphFileError(
                    f"{path}, line {number}: not UTF-8 (byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}); save the file as UTF-8, or pass on_error='skip' "
                    "(--on_error=skip) to leave such rows out") from None
            skipped += 1
    return lines, skipped


def read_molecule_csv(path, smiles_column="smiles", label_columns=None, on_error="raise",
                      binary=False, allow_missing=True):
    """Molecules and labels from a UTF-8 CSV with a header (MoleculeNet layout).

    ``label_columns`` default: every column but the SMILES one. ``binary``: every label must
    be 0 or 1 (or empty: missing), as a BCE loss needs; otherwise any finite number.
    ``allow_missing=False``: an empty cell is an error too (e.g. a task scored on every
    molecule). Rows are
    numbered as in a spreadsheet (the header is row 1); an error names file, row and column.
    ``on_error="skip"`` leaves out rows with an invalid SMILES, label or encoding (counted in
    ``skipped``, warned); the dataset's ``smiles`` are those of the rows kept.
    """
    _check_on_error(on_error)
    if not os.path.exists(path):
        raise GraphFileError(f"{path}: no such file")
    lines, skipped = _utf8_lines(path, on_error)
    if lines and lines[0][0] != 1:
        raise GraphFileError(f"{path}, line 1: the header is not UTF-8")
    reader = csv.DictReader(text for _, text in lines)
    header = reader.fieldnames or []
    if smiles_column not in header:
        raise GraphFileError(f"{path}: no column {smiles_column!r} (columns: {header})")
    tasks = list(label_columns) if label_columns is not None else [c for c in header if c != smiles_column]
    missing = [c for c in tasks if c not in header]
    if missing:
        raise GraphFileError(f"{path}: no label column(s) {missing}")
    graphs, labels, smiles = [], [], []
    for row in reader:
        where = f"{path}, row {lines[reader.line_num - 1][0]}"
        try:
            graph = smiles_to_graph(row[smiles_column], where=where)
            values = [_parse_label(row[c] or "", f"{where}, column {c!r}", binary,
                                   allow_missing) for c in tasks]
        except (InvalidSmilesError, GraphFileError) as e:
            if on_error == "raise":
                raise GraphFileError(str(e)) from None
            skipped += 1
            continue
        graphs.append(graph)
        labels.append(values)
        smiles.append(row[smiles_column])
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} row(s) with an invalid SMILES, label or "
                      "encoding")
    if not graphs:
        raise GraphFileError(f"{path}: no usable rows")
    return GraphDataset(graphs, np.array(labels, np.float32).reshape(len(graphs), len(tasks)),
                        tasks, skipped, path, smiles=smiles)


def _read_ints(path, columns, required=True):
    if not os.path.exists(path):
        if required:
            raise GraphFileError(f"{path}: no such file")
        return None
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.replace(",", " ").split()]
            if len(parts) < columns:
                raise GraphFileError(f"{path}, line {line_number}: expected {columns} value(s), "
                                     f"got {line.strip()!r}")
            try:
                rows.append([int(float(p)) for p in parts[:columns]])
            except ValueError:
                raise GraphFileError(f"{path}, line {line_number}: not an integer: "
                                     f"{line.strip()!r}") from None
    return np.array(rows, np.int64).reshape(-1, columns)


def read_tudataset(directory, name, on_error="raise"):
    """A TUDataset (text format) from ``directory``; labels are the graph labels (one task)."""
    _check_on_error(on_error)
    base = os.path.join(directory, name)
    edges = _read_ints(f"{base}_A.txt", 2)
    indicator = _read_ints(f"{base}_graph_indicator.txt", 1)[:, 0]
    graph_labels = _read_ints(f"{base}_graph_labels.txt", 1)[:, 0]
    node_labels = _read_ints(f"{base}_node_labels.txt", 1, required=False)
    edge_labels = _read_ints(f"{base}_edge_labels.txt", 1, required=False)
    num_nodes, num_graphs = len(indicator), len(graph_labels)
    if node_labels is not None and len(node_labels) != num_nodes:
        raise GraphFileError(f"{base}_node_labels.txt has {len(node_labels)} lines for "
                             f"{num_nodes} nodes in {base}_graph_indicator.txt")
    if edge_labels is not None and len(edge_labels) != len(edges):
        raise GraphFileError(f"{base}_edge_labels.txt has {len(edge_labels)} lines for "
                             f"{len(edges)} edges in {base}_A.txt")
    if indicator.min() < 1 or indicator.max() > num_graphs:
        bad = int(np.argmax((indicator < 1) | (indicator > num_graphs))) + 1
        raise GraphFileError(f"{base}_graph_indicator.txt, line {bad}: graph id "
                             f"{indicator[bad - 1]} outside 1..{num_graphs} "
                             f"({base}_graph_labels.txt has {num_graphs} lines)")
    if len(edges) and (edges.min() < 1 or edges.max() > num_nodes):
        bad = int(np.argmax((edges.min(1) < 1) | (edges.max(1) > num_nodes))) + 1
        raise GraphFileError(f"{base}_A.txt, line {bad}: node id outside 1..{num_nodes}")
    node_graph = indicator - 1
    edge_graph = node_graph[edges[:, 0] - 1] if len(edges) else np.zeros(0, np.int64)
    if len(edges) and np.any(edge_graph != node_graph[edges[:, 1] - 1]):
        bad = int(np.argmax(edge_graph != node_graph[edges[:, 1] - 1])) + 1
        raise GraphFileError(f"{base}_A.txt, line {bad}: edge joins nodes of two graphs")
    nodes_of = np.argsort(node_graph, kind="stable")
    starts = np.searchsorted(node_graph[nodes_of], np.arange(num_graphs + 1))
    local = np.empty(num_nodes, np.int64)
    graphs, labels, skipped = [], [], 0
    for g in range(num_graphs):
        members = nodes_of[starts[g]:starts[g + 1]]
        if len(members) == 0:
            message = f"{base}_graph_indicator.txt: graph {g + 1} has no nodes"
            if on_error == "raise":
                raise GraphFileError(message)
            skipped += 1
            continue
        local[members] = np.arange(len(members))
        mask = edge_graph == g
        e = edges[mask] - 1
        graphs.append({
            "node_features": (node_labels[members] if node_labels is not None
                              else np.zeros((len(members), 1))).astype(np.int32),
            "edge_index": local[e].astype(np.int32).reshape(-1, 2),
            "edge_features": (edge_labels[mask] if edge_labels is not None
                              else np.zeros((int(mask.sum()), 1))).astype(np.int32),
        })
        labels.append([float(graph_labels[g])])
    if skipped:
        warnings.warn(f"{base}: skipped {skipped} empty graph(s)")
    return GraphDataset(graphs, np.array(labels, np.float32), ["graph_label"], skipped, base)


def save_graphs_npz(path, dataset):
    """Writes a GraphDataset in the keras_metapt .npz graph format (see the module doc)."""
    graphs = dataset.graphs
    node_offsets = np.cumsum([0] + [len(g["node_features"]) for g in graphs])
    edge_offsets = np.cumsum([0] + [len(g["edge_index"]) for g in graphs])
    arrays = dict(
        node_features=np.concatenate([g["node_features"] for g in graphs]).astype(np.int32),
        node_offsets=node_offsets, edge_offsets=edge_offsets,
        edge_index=np.concatenate([g["edge_index"] for g in graphs]).astype(np.int32).reshape(-1, 2),
        edge_features=np.concatenate([g["edge_features"] for g in graphs]).astype(np.int32),
        labels=np.asarray(dataset.labels, np.float32), task_names=np.array(dataset.task_names))
    if dataset.centers is not None:
        arrays["centers"] = np.asarray(dataset.centers, np.int32)
    np.savez_compressed(path, **arrays)


def load_graphs_npz(path):
    """Reads the keras_metapt .npz graph format into a GraphDataset (checks its consistency)."""
    if not os.path.exists(path):
        raise GraphFileError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as data:
        required = {"node_features", "node_offsets", "edge_index", "edge_features", "edge_offsets",
                    "labels", "task_names"}
        missing = sorted(required - set(data.files))
        if missing:
            raise GraphFileError(f"{path}: missing array(s) {missing}")
        no, eo = data["node_offsets"], data["edge_offsets"]
        labels = data["labels"].astype(np.float32)
        if len(no) != len(eo) or len(no) - 1 != len(labels):
            raise GraphFileError(f"{path}: {len(no) - 1} graphs by node_offsets, {len(eo) - 1} by "
                                 f"edge_offsets, {len(labels)} label rows")
        graphs = []
        for g in range(len(labels)):
            n = no[g + 1] - no[g]
            e = data["edge_index"][eo[g]:eo[g + 1]]
            if n == 0:
                raise GraphFileError(f"{path}: graph {g} has no nodes")
            if len(e) and (e.min() < 0 or e.max() >= n):
                raise GraphFileError(f"{path}: graph {g} has an edge outside its {n} nodes")
            graphs.append({"node_features": data["node_features"][no[g]:no[g + 1]],
                           "edge_index": e, "edge_features": data["edge_features"][eo[g]:eo[g + 1]]})
        centers = data["centers"] if "centers" in data.files else None
        return GraphDataset(graphs, labels, [str(t) for t in data["task_names"]], 0, path, centers)
