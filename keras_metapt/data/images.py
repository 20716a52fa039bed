"""Image datasets from files the user points to: IDX files (MNIST / Fashion-MNIST layout, e.g.
Debian's dataset-fashion-mnist package under /usr/share/datasets/fashion-mnist) or a folder of
images with one sub-folder per class."""

import gzip
import os

import numpy as np

__all__ = ["ImageFileError", "read_idx", "load_idx_dataset", "load_image_folder",
           "labelled_subset", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "load_digits_28x28"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class ImageFileError(ValueError):
    """A missing or malformed image file; the message names the file."""


def read_idx(path):
    """An IDX file (optionally gzip-compressed) as a NumPy array of its stated shape."""
    if not os.path.exists(path):
        raise ImageFileError(f"IDX file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ImageFileError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ImageFileError(f"{path}: header says shape {shape} ({expected} bytes of data), the "
                             f"file holds {len(data) - header}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise ImageFileError(f"{directory} has no {stem}[.gz] (expected the MNIST/Fashion-MNIST IDX "
                         "files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...)")


def load_idx_dataset(directory=FASHION_MNIST_DIR):
    """((x_train, y_train), (x_test, y_test)) from the four IDX files in ``directory``.

    Images are float32 in [0, 1] with a channel axis ([n, 28, 28, 1]); labels int32.
    """
    if not os.path.isdir(directory):
        raise ImageFileError(f"image directory not found: {directory} (for Fashion-MNIST: apt "
                             "install dataset-fashion-mnist, or point to a folder of IDX files)")
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ImageFileError(f"{directory}: {prefix} has {len(images)} images but "
                                 f"{len(labels)} labels")
        splits.append(((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)))
    return tuple(splits)


def load_image_folder(directory):
    """(images [n, h, w, c] float32 in [0, 1], labels int32, class names) from
    ``directory/<class>/<image>``; every image must have the same size (the error names the
    first that does not)."""
    import tensorflow as tf
    if not os.path.isdir(directory):
        raise ImageFileError(f"image folder not found: {directory}")
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    if not classes:
        raise ImageFileError(f"{directory} has no class sub-folders")
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(directory, name))):
            if not file.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            path = os.path.join(directory, name, file)
            try:
                image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()
            except Exception as error:  # noqa: BLE001 - re-raised with the file named
                raise ImageFileError(f"cannot decode {path}: {error}") from error
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise ImageFileError(f"{path} has shape {image.shape}, the others {shape}")
            images.append(image)
            labels.append(label)
    if not images:
        raise ImageFileError(f"{directory} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
    return (np.stack(images).astype(np.float32) / 255.0, np.array(labels, np.int32),
            tuple(classes))


def labelled_subset(num_examples, fraction=None, count=None, seed=0):
    """Indices of the first ``count`` (or ``fraction`` x num_examples) examples of a seeded
    permutation: the labelled part of a semi-supervised split."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if count is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * num_examples)))
    if count > num_examples:
        raise ValueError(f"count {count} exceeds the {num_examples} examples")
    return np.random.default_rng(seed).permutation(num_examples)[:count]


def load_digits_28x28():
    """scikit-learn's digits as [1797, 28, 28, 1] float32 in [0, 1] (bilinear upsampling of
    the 8x8 images, whose values are 0..16) and their labels."""
    import tensorflow as tf
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing downloads
    digits = load_digits()
    small = (digits.images.astype(np.float32) / 16.0)[..., None]
    large = tf.image.resize(small, [28, 28], method="bilinear").numpy()
    return np.clip(large, 0.0, 1.0), digits.target.astype(np.int32)
