"""NT-Xent against a direct float64 computation written from the definition (loops in NumPy)."""

import numpy as np
import tensorflow as tf

from keras_metapt.losses import nt_xent, simclr_pt_loss


def direct_nt_xent(z1, z2, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2, n = len(u), len(u) // 2
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        sims = [u[i] @ u[j] / temperature for j in range(n2) if j != i]
        total += -u[i] @ u[positive] / temperature + np.log(np.sum(np.exp(sims)))
    return total / n2


def test_nt_xent_matches_the_definition_in_float64():
    rng = np.random.default_rng(0)
    for n, d, temperature in ((4, 3, 0.5), (7, 16, 0.1), (2, 2, 1.0)):
        z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        got = float(nt_xent(tf.constant(z1), tf.constant(z2), temperature))
        np.testing.assert_allclose(got, direct_nt_xent(z1, z2, temperature), rtol=1e-12)


def test_nt_xent_is_small_for_matching_views_and_gradients_are_finite():
    rng = np.random.default_rng(1)
    z = tf.constant(rng.normal(size=(16, 8)))
    same = float(nt_xent(z, z, 0.1))
    other = float(nt_xent(z, tf.constant(rng.normal(size=(16, 8))), 0.1))
    assert same < other
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = simclr_pt_loss(0.5)(None, tf.concat([z, z * 2.0], 0))
    assert np.all(np.isfinite(tape.gradient(loss, z).numpy()))
