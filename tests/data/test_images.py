"""IDX and image-folder loaders. References: arrays written here in the IDX format
(big-endian header, as in the MNIST/Fashion-MNIST distribution) and as PNG files, read back."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from keras_metapt.data.images import (FASHION_MNIST_DIR, ImageFileError, labelled_subset,
                                      load_idx_dataset, load_image_folder, read_idx)


def write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_fashion_like(directory, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels, compress=False)
        arrays[prefix] = (images, labels)
    return arrays


def test_idx_round_trip(tmp_path):
    arrays = write_fashion_like(str(tmp_path))
    (x, y), (x_test, y_test) = load_idx_dataset(str(tmp_path))
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0] * 255.0, arrays["train"][0], atol=1e-4)
    np.testing.assert_array_equal(y, arrays["train"][1])
    np.testing.assert_array_equal(y_test, arrays["t10k"][1])


def test_bad_idx_files_are_named(tmp_path):
    write_fashion_like(str(tmp_path))
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")  # says 5 labels, holds 2
    with pytest.raises(ImageFileError, match="train-labels-idx1-ubyte.*5"):
        read_idx(str(bad))
    write_fashion_like(str(tmp_path))
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ImageFileError, match="t10k-images-idx3-ubyte"):
        load_idx_dataset(str(tmp_path))
    with pytest.raises(ImageFileError, match="not found"):
        load_idx_dataset(str(tmp_path / "nowhere"))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            image = rng.integers(0, 256, size=(8, 8, 1)).astype(np.uint8)
            tf.io.write_file(str(tmp_path / cls / f"{i}.png"), tf.io.encode_png(image))
    x, y, classes = load_image_folder(str(tmp_path))
    assert x.shape == (6, 8, 8, 1) and classes == ("cat", "dog")
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1])
    tf.io.write_file(str(tmp_path / "dog" / "big.png"), tf.io.encode_png(np.zeros((9, 8, 1), np.uint8)))
    with pytest.raises(ImageFileError, match="big.png"):
        load_image_folder(str(tmp_path))


def test_labelled_subset_is_seeded():
    a = labelled_subset(100, fraction=0.1, seed=3)
    assert len(a) == 10 and len(set(a)) == 10
    np.testing.assert_array_equal(a, labelled_subset(100, count=10, seed=3))
    with pytest.raises(ValueError):
        labelled_subset(100, count=101)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_package_reads():
    (x, y), (x_test, y_test) = load_idx_dataset()
    assert x.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert sorted(np.unique(y)) == list(range(10))
