"""Small helpers over nested structures of tensors (lists, tuples, dicts).

Parameters, hyperparameters and optimizer states in keras_metapt are nests of
tensors, as `tf.nest` understands them. These helpers do the arithmetic that
solvers and estimators need on such nests, and give every leaf a readable name
for error messages.
"""

import keras
import tensorflow as tf

__all__ = []  # internal module


def leaf_names(structure, prefix):
    """Names such as ``hparams[0]`` or ``params['dense/kernel']``, one per leaf.

    A `tf.Variable` leaf is also named by its own name, so that errors point at
    what the user created.
    """
    names = []
    for path, leaf in keras.tree.flatten_with_path(structure):
        name = prefix + "".join(f"[{key!r}]" for key in path)
        var_name = getattr(leaf, "path", None) or (
            getattr(leaf, "name", None) if isinstance(leaf, tf.Variable) else None)
        if var_name:
            name = f"{name} ({var_name})"
        names.append(name)
    return names


def leaf_shapes(structure, prefix):
    """(name, shape tuple) for every leaf that has a shape (numbers count as scalars; other
    objects are skipped). Names as `leaf_names`."""
    out = []
    for name, leaf in zip(leaf_names(structure, prefix), keras.tree.flatten(structure)):
        shape = getattr(leaf, "shape", None)
        if shape is None and isinstance(leaf, (int, float)):
            shape = ()
        if shape is not None:
            out.append((name, tuple(shape)))
    return out


def cast_scalar(value, dtype):
    """A scalar in ``dtype``. Python numbers are converted directly (tf.cast of a
    Python float would round it through float32 first)."""
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def densify(structure):
    """`tf.IndexedSlices` leaves (gradients of gathers) as dense tensors; None stays None."""
    return tf.nest.map_structure(
        lambda x: tf.convert_to_tensor(x) if isinstance(x, tf.IndexedSlices) else x, structure)


def to_tensors(structure):
    """Reads variables and converts array-likes to tensors, keeping the nest."""
    return tf.nest.map_structure(tf.convert_to_tensor, structure)


def tree_map(fn, *structures):
    return tf.nest.map_structure(fn, *structures)


def tree_add(a, b):
    return tf.nest.map_structure(lambda x, y: x + y, a, b)


def tree_sub(a, b):
    return tf.nest.map_structure(lambda x, y: x - y, a, b)


def tree_scale(a, scalar):
    return tf.nest.map_structure(lambda x: cast_scalar(scalar, x.dtype) * x, a)


def tree_axpy(alpha, x, y):
    """alpha * x + y, leaf by leaf."""
    return tf.nest.map_structure(lambda u, v: cast_scalar(alpha, u.dtype) * u + v, x, y)


def tree_vdot(a, b):
    """Sum over all leaves of the elementwise product: the inner product <a, b>. Leaves may
    be `tf.IndexedSlices` (gradients of gathers), made dense here."""
    terms = [tf.reduce_sum(tf.convert_to_tensor(x) * tf.convert_to_tensor(y))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def tree_zeros_like(a):
    return tf.nest.map_structure(tf.zeros_like, a)


def tree_stop_gradient(a):
    return tf.nest.map_structure(tf.stop_gradient, a)


def zeros_for_none(grads, like):
    """Replaces None gradients by zeros shaped like the matching leaf of ``like``."""
    return tf.nest.map_structure(
        lambda g, x: tf.zeros_like(x) if g is None else g, grads, like)
