"""Gradient descent on a quadratic, with its closed-form iterate as the reference.

inner_t(w; phi) = 1/2 w^T (A + diag(exp(c))) w - b_t^T w        hparams = [c (d,), lr blocks (B,)]
outer(w; phi)   = 1/2 ||w - target||^2 + gamma/2 ||c||^2          (a direct term in c)
learning rate at step t = lr[floor(t B / T)].
"""

import numpy as np
import tensorflow as tf

import keras_metapt as km
from tests import references
from keras_metapt.hyper import piecewise_constant
from tests.conftest import central_differences

D, BLOCKS, GAMMA = 5, 4, 0.05


class Quadratic:
    def __init__(self, num_steps=12, seed=0, per_step_b=False):
        rng = np.random.default_rng(seed)
        m = rng.normal(size=(D, D))
        self.a = m @ m.T / D + 0.5 * np.eye(D)
        self.num_steps = num_steps
        self.b = rng.normal(size=(num_steps, D)) if per_step_b else rng.normal(size=D)
        self.target = rng.normal(size=D)
        self.w0 = rng.normal(size=D)
        self.c = rng.normal(size=D) * 0.3 - 1.0
        self.lr = np.array([0.25, 0.15, 0.3, 0.2])[:BLOCKS]

    # -- TensorFlow side ----------------------------------------------------
    def problem(self):
        a = self.a

        def inner(params, hparams, b):
            w = params[0]
            curv = tf.constant(a, w.dtype) + tf.linalg.diag(tf.exp(hparams[0]))
            return 0.5 * tf.tensordot(w, tf.linalg.matvec(curv, w), 1) - tf.tensordot(b, w, 1)

        def outer(params, hparams, target):
            return (0.5 * tf.reduce_sum((params[0] - target) ** 2)
                    + 0.5 * GAMMA * tf.reduce_sum(hparams[0] ** 2))

        return km.BilevelProblem(
            inner, outer,
            inner_optimizer_hparams=lambda h, t, T: {"learning_rate": piecewise_constant(h[1], t, T)})

    def inputs(self, dtype=np.float64):
        b = self.b.astype(dtype)
        inner_batch = km.StepBatches(b) if self.b.ndim == 2 else b
        return ([self.w0.astype(dtype)], [self.c.astype(dtype), self.lr.astype(dtype)],
                inner_batch, self.target.astype(dtype))

    # -- NumPy reference ------------------------------------------------------
    def step_lrs(self, lr):
        T = self.num_steps
        return [lr[(t * len(lr)) // T] for t in range(T)]

    def outer_after(self, c, lr, start=0, w_start=None):
        """Closed-form outer loss after steps start..T-1 from w_start (default: w0 at 0)."""
        curv = self.a + np.diag(np.exp(c))
        lrs = self.step_lrs(lr)[start:]
        b = self.b[start:] if self.b.ndim == 2 else self.b
        w = references.quadratic_gd_iterate(curv, b, self.w0 if w_start is None else w_start, lrs)
        return 0.5 * np.sum((w - self.target) ** 2) + 0.5 * GAMMA * np.sum(c ** 2)

    def iterate(self, c, lr, stop):
        curv = self.a + np.diag(np.exp(c))
        b = self.b[:stop] if self.b.ndim == 2 else self.b
        return references.quadratic_gd_iterate(curv, b, self.w0, self.step_lrs(lr)[:stop])

    def finite_difference(self, fn, h=1e-6):
        """Central differences in float64 of fn(c, lr) with respect to c and lr."""
        return central_differences(fn, [self.c, self.lr], h)
