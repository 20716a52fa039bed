"""Shared fixtures. Every test names the exact reference it checks against."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_metapt as km  # noqa: E402


def compiled(fn, mode):
    """fn as run in a given mode: 'eager', 'graph' (tf.function) or 'xla'."""
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "xla"))


class Ridge:
    """Ridge regression with per-feature (or scalar) log-penalties as hyperparameters.

    inner: ||X w - y||^2 / (2n) + 1/2 sum_j exp(h_j) w_j^2;  outer: ||X_v w - y_v||^2 / (2 n_v).
    """

    def __init__(self, n=60, d=6, n_val=40, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, d))
        self.x_val = rng.normal(size=(n_val, d))
        w_true = rng.normal(size=d)
        self.y = self.x @ w_true + 0.5 * rng.normal(size=n)
        self.y_val = self.x_val @ w_true + 0.5 * rng.normal(size=n_val)
        self.log_lam = rng.normal(size=d) - 1.0

    @staticmethod
    def inner(params, hparams, batch):
        x, y = batch
        w = params[0]
        r = tf.linalg.matvec(x, w) - y
        n = tf.cast(tf.shape(x)[0], w.dtype)
        return tf.reduce_sum(r ** 2) / (2 * n) + 0.5 * tf.reduce_sum(tf.exp(hparams[0]) * w ** 2)

    @staticmethod
    def outer(params, hparams, batch):
        x, y = batch
        r = tf.linalg.matvec(x, params[0]) - y
        n = tf.cast(tf.shape(x)[0], r.dtype)
        return tf.reduce_sum(r ** 2) / (2 * n)

    def problem(self):
        return km.BilevelProblem(self.inner, self.outer)

    def batches(self, dtype=np.float64):
        return ((self.x.astype(dtype), self.y.astype(dtype)),
                (self.x_val.astype(dtype), self.y_val.astype(dtype)))


@pytest.fixture
def ridge():
    return Ridge()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def central_differences(fn, values, h=1e-6):
    """Central differences (float64) of fn(*values) with respect to every entry of every array."""
    grads = []
    for which in range(len(values)):
        grad = np.zeros_like(values[which])
        for i in range(len(grad)):
            up = [np.array(v, copy=True) for v in values]
            down = [np.array(v, copy=True) for v in values]
            up[which][i] += h
            down[which][i] -= h
            grad[i] = (fn(*up) - fn(*down)) / (2 * h)
        grads.append(grad)
    return grads
