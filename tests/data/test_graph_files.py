"""Graph file readers on files written here in the real formats.

References: the graphs and labels each file encodes, written out by hand.
"""

import numpy as np
import pytest

from keras_metapt.data.graph_files import (GraphFileError, load_graphs_npz, read_molecule_csv,
                                           read_tudataset, save_graphs_npz)


def write(path, text):
    path.write_text(text)
    return str(path)


CSV = "smiles,active,toxic\nCCO,1,0\nc1ccccc1,,1\nC1CC,1,1\nC[C@H](N)C(=O)O,0,\n"


def test_molecule_csv_with_missing_labels(tmp_path):
    path = write(tmp_path / "mols.csv", CSV.replace("C1CC,1,1\n", ""))
    data = read_molecule_csv(path)
    assert data.task_names == ["active", "toxic"] and len(data.graphs) == 3
    np.testing.assert_array_equal(np.isnan(data.labels), [[0, 0], [1, 0], [0, 1]])
    assert data.labels[0].tolist() == [1.0, 0.0] and len(data.graphs[1]["node_features"]) == 6


def test_molecule_csv_invalid_smiles_raises_or_is_counted(tmp_path):
    path = write(tmp_path / "mols.csv", CSV)
    with pytest.raises(GraphFileError, match=r"mols.csv, row 4.*'C1CC'"):
        read_molecule_csv(path)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        data = read_molecule_csv(path, on_error="skip")
    assert data.skipped == 1 and len(data.graphs) == 3


def test_molecule_csv_bad_label_and_columns(tmp_path):
    path = write(tmp_path / "mols.csv", "smiles,active\nCCO,yes\n")
    with pytest.raises(GraphFileError, match=r"row 2, column 'active': label 'yes'"):
        read_molecule_csv(path)
    with pytest.raises(GraphFileError, match="no column 'SMILES'"):
        read_molecule_csv(path, smiles_column="SMILES")


def tudataset(tmp_path, a_extra="", indicator="1\n1\n1\n2\n2\n3\n", labels="1\n-1\n1\n"):
    # graph 1: triangle 1-2-3; graph 2: edge 4-5; graph 3: the single node 6.
    write(tmp_path / "TOY_A.txt", "1, 2\n2, 1\n2, 3\n3, 2\n1, 3\n3, 1\n4, 5\n5, 4\n" + a_extra)
    write(tmp_path / "TOY_graph_indicator.txt", indicator)
    write(tmp_path / "TOY_graph_labels.txt", labels)
    write(tmp_path / "TOY_node_labels.txt", "0\n1\n2\n0\n0\n3\n")
    write(tmp_path / "TOY_edge_labels.txt", "0\n0\n1\n1\n2\n2\n0\n0\n" + ("0\n" if a_extra else ""))
    return str(tmp_path)


def test_tudataset_reads_graphs(tmp_path):
    data = read_tudataset(tudataset(tmp_path), "TOY")
    assert [len(g["node_features"]) for g in data.graphs] == [3, 2, 1]
    assert data.labels[:, 0].tolist() == [1.0, -1.0, 1.0]
    assert data.graphs[0]["node_features"][:, 0].tolist() == [0, 1, 2]
    assert sorted(map(tuple, data.graphs[1]["edge_index"].tolist())) == [(0, 1), (1, 0)]
    assert data.graphs[2]["edge_index"].shape == (0, 2)
    assert data.graphs[0]["edge_features"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_tudataset_errors_name_file_and_line(tmp_path):
    with pytest.raises(GraphFileError, match=r"TOY_A.txt, line 9: edge joins nodes of two graphs"):
        read_tudataset(tudataset(tmp_path, a_extra="3, 4\n"), "TOY")
    with pytest.raises(GraphFileError, match=r"graph_indicator.txt, line 6: graph id 4 outside"):
        read_tudataset(tudataset(tmp_path, indicator="1\n1\n1\n2\n2\n4\n"), "TOY")
    with pytest.raises(GraphFileError, match=r"graph 3 has no nodes"):
        read_tudataset(tudataset(tmp_path, labels="1\n-1\n1\n0\n", indicator="1\n1\n1\n2\n2\n4\n"), "TOY")
    with pytest.warns(UserWarning, match="skipped 1 empty graph"):
        data = read_tudataset(tudataset(tmp_path, labels="1\n-1\n1\n0\n",
                                        indicator="1\n1\n1\n2\n2\n4\n"), "TOY", on_error="skip")
    assert data.skipped == 1 and len(data.graphs) == 3


def test_npz_round_trip_and_corruption(tmp_path):
    data = read_tudataset(tudataset(tmp_path), "TOY")
    path = str(tmp_path / "toy.npz")
    save_graphs_npz(path, data)
    back = load_graphs_npz(path)
    assert back.task_names == data.task_names
    np.testing.assert_array_equal(back.labels, data.labels)
    for a, b in zip(back.graphs, data.graphs):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    arrays = dict(np.load(path))
    arrays["edge_index"] = arrays["edge_index"] + 5
    np.savez(path, **arrays)
    with pytest.raises(GraphFileError, match="graph 0 has an edge outside its 3 nodes"):
        load_graphs_npz(path)


def test_tfds_round_trip_keeps_order_and_missing_labels(tmp_path):
    from keras_metapt.data.tfds_graphs import read_graph_tfds, write_graph_tfds
    path = write(tmp_path / "mols.csv", CSV.replace("C1CC,1,1\n", ""))
    data = read_molecule_csv(path)
    directory = write_graph_tfds({"train": data}, "toy_mols", str(tmp_path / "tfds"))
    back = read_graph_tfds(directory, "train", data.task_names)
    np.testing.assert_array_equal(np.isnan(back.labels), np.isnan(data.labels))
    np.testing.assert_array_equal(np.nan_to_num(back.labels), np.nan_to_num(data.labels))
    for a, b in zip(back.graphs, data.graphs):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_molecule_csv_not_utf8_names_file_and_line_and_skip_keeps_row_numbers(tmp_path):
    path = tmp_path / "mols.csv"
    path.write_bytes(b"smiles,active\nCCO,1\nC\xe9C,0\nc1ccccc1,0\nC1CC,1\n")
    with pytest.raises(GraphFileError, match=r"mols.csv, line 3: not UTF-8 \(byte 0xe9 at column 2\)"):
        read_molecule_csv(str(path))
    # skip: the undecodable line and the invalid SMILES go, and the rows kept keep their SMILES
    with pytest.warns(UserWarning, match="skipped 2 row"):
        data = read_molecule_csv(str(path), on_error="skip")
    assert data.smiles == ["CCO", "c1ccccc1"] and data.labels[:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(GraphFileError, match=r"ok.csv, row 5.*'C1CC'"):
        read_molecule_csv(write(tmp_path / "ok.csv", "smiles,active\nCCO,1\nCC,0\nCCC,1\nC1CC,1\n"))


def test_molecule_csv_utf8_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfsmiles,active\nCCO,1\n")
    assert read_molecule_csv(str(path)).smiles == ["CCO"]


@pytest.mark.parametrize("value", ["2", "3.7", "-1", "inf"])
def test_binary_labels_refuse_values_other_than_0_and_1(tmp_path, value):
    path = write(tmp_path / "mols.csv", f"smiles,active\nCCO,1\nCCN,{value}\nCCC,\n")
    with pytest.raises(GraphFileError, match=rf"row 3, column 'active': label '{value}' is not 0 or 1"):
        read_molecule_csv(path, binary=True)
    if value != "inf":  # a regression label may be any finite number
        assert read_molecule_csv(path).labels[1, 0] == float(value)
    with pytest.raises(GraphFileError, match=r"row 4, column 'active': the label is missing"):
        read_molecule_csv(write(tmp_path / "m.csv", "smiles,active\nCCO,1\nCCN,0\nCCC,\n"),
                          binary=True, allow_missing=False)
