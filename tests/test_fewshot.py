"""Prototypical networks with feature-wise transformations (keras_metapt.fewshot).

References: a NumPy transcription of the encoder (3x3 'same' convolution, batch statistics,
the transformation, ReLU, 2x2 max-pool) and of the prototype logits; float64 central finite
differences of the bilevel objectives the trainer's hypergradients estimate: for the
second-order arm L_pu(theta - lr grad_theta L_ps(theta, phi)), for EvoGrad
L_pu(sum_k softmax(-L_ps(theta_k, phi) / tau)_k theta_k) with the copies theta_k rebuilt from
their definition; Adam's first step (-lr sign(g) when |g| >> epsilon) for the trainer's update
of phi.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import fewshot, optim
from keras_metapt.hyper import FeatureWiseTransforms

N_WAY, K_SHOT, N_QUERY, SIZE = 2, 2, 2, 8


def np_conv_same(x, kernel):
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,cd->nhwd", padded[:, i:i + h, j:j + w], kernel[i, j])
    return out


def np_softplus(x):
    return np.log1p(np.exp(x))


def np_features(params, images, phi=None, noises=None):
    h = images
    for b in range(len(params) // 3):
        kernel, gamma, beta = params[3 * b:3 * b + 3]
        h = np_conv_same(h, kernel)
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        h = (h - mean) / np.sqrt(var + 1e-5) * gamma + beta
        if phi is not None:
            n, m = noises[b]
            h = h * (1 + n * np_softplus(phi[2 * b])) + m * np_softplus(phi[2 * b + 1])
        h = np.maximum(h, 0)
        n_, hh, ww, c = h.shape
        h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n_, hh // 2, 2, ww // 2, 2, c).max((2, 4))
    return h.reshape(len(h), -1)


def np_logits(support, query, n_way):
    prototypes = support.reshape(n_way, -1, support.shape[-1]).mean(1)
    return -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)


def tiny(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    params = []
    c_in = 1
    for _ in range(2):
        params += [rng.standard_normal((3, 3, c_in, 3)) * 0.5, 1 + 0.1 * rng.standard_normal(3),
                   0.1 * rng.standard_normal(3)]
        c_in = 3
    phi = [0.3 + 0.2 * rng.standard_normal(3) for _ in range(4)]

    def episode(s):
        r = np.random.default_rng(s)
        return (r.random((N_WAY * K_SHOT, SIZE, SIZE, 1)), r.random((N_WAY * N_QUERY, SIZE, SIZE, 1)),
                np.repeat(np.arange(N_WAY), N_QUERY).astype(np.int32))
    as_tf = lambda xs: [tf.constant(np.asarray(x, dtype)) for x in xs]  # noqa: E731
    seen = tuple(tf.constant(a) if a.dtype == np.int32 else tf.constant(a.astype(dtype))
                 for a in episode(seed + 1))
    unseen = tuple(tf.constant(a) if a.dtype == np.int32 else tf.constant(a.astype(dtype))
                   for a in episode(seed + 2))
    return as_tf(params), as_tf(phi), seen, unseen


def block_noises(seed, blocks, channels):
    out = []
    for block_seed in tf.random.experimental.stateless_split(seed, blocks):
        a, b = tf.random.experimental.stateless_split(block_seed, 2)
        out.append((tf.random.stateless_normal([channels], a).numpy().astype(np.float64),
                    tf.random.stateless_normal([channels], b).numpy().astype(np.float64)))
    return out


def test_encoder_and_logits_match_a_numpy_transcription():
    params, phi, seen, _ = tiny()
    seed = tf.constant([4, 2], tf.int64)
    images = tf.concat([seen[0], seen[1]], 0)
    np_params = [p.numpy() for p in params]
    plain = fewshot.encoder_features(params, images).numpy()
    np.testing.assert_allclose(plain, np_features(np_params, images.numpy()), rtol=1e-10)
    noisy = fewshot.encoder_features(params, images, phi, seed).numpy()
    expected = np_features(np_params, images.numpy(), [p.numpy() for p in phi],
                           block_noises(seed, 2, 3))
    np.testing.assert_allclose(noisy, expected, rtol=1e-10, atol=1e-12)
    logits = fewshot.episode_logits(params, seen, N_WAY).numpy()
    features = np_features(np_params, images.numpy())
    np.testing.assert_allclose(logits, np_logits(features[:4], features[4:], N_WAY), rtol=1e-10)


def trainer(estimator=None, lr=0.05):
    encoder = fewshot.ConvEncoder(width=3, blocks=2, seed=0)
    transforms = FeatureWiseTransforms(encoder.channels())
    return fewshot.PrototypicalTrainer(
        encoder, n_way=N_WAY, learning_rate=lr, transforms=transforms,
        transform_optimizer=keras.optimizers.Adam(0.01, epsilon=1e-12) if estimator else None,
        estimator=estimator)


def finite_difference(fn, phi, eps=1e-6):
    out = []
    for i, leaf in enumerate(phi):
        grad = np.zeros(leaf.shape)
        for j in range(leaf.shape[0]):
            step = np.zeros(leaf.shape)
            step[j] = eps
            plus = [p + step if k == i else p for k, p in enumerate(phi)]
            minus = [p - step if k == i else p for k, p in enumerate(phi)]
            grad[j] = (fn(plus) - fn(minus)).numpy() / (2 * eps)
        out.append(grad)
    return out


def test_second_order_hypergradient_matches_finite_differences_of_the_look_ahead():
    lr = 0.05
    problem = trainer(km.Unrolled(optim.sgd(lr), 1), lr=lr).problem()
    params, phi, seen, unseen = tiny()
    seed = tf.constant([1, 7], tf.int64)
    inner_batch = seen + (seed,)
    result = km.Unrolled(optim.sgd(lr), 1)(problem, params, phi, inner_batch, unseen)

    def objective(phi_):
        with tf.GradientTape() as tape:
            tape.watch(params)
            inner = fewshot.episode_loss(params, seen, N_WAY, phi_, seed)
        grads = tape.gradient(inner, params)
        moved = [p - lr * g for p, g in zip(params, grads)]
        return fewshot.episode_loss(moved, unseen, N_WAY)

    for got, want in zip(result.hypergrad, finite_difference(objective, phi)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)
    assert np.abs(np.concatenate([g.numpy() for g in result.hypergrad])).max() > 1e-6


def test_evograd_hypergradient_matches_finite_differences_of_its_combination():
    sigma, tau = 1e-2, 0.5
    estimator = km.EvoGrad(2, sigma, tau, noise="rademacher")
    problem = trainer(estimator).problem()
    params, phi, seen, unseen = tiny(seed=3)
    noise_seed, copies_seed = tf.constant([2, 2], tf.int64), tf.constant([8, 1], tf.int64)
    result = estimator(problem, params, phi, seen + (noise_seed,), unseen, seed=copies_seed)
    # theta_k = theta + sigma * (2 bits - 1): per leaf one stateless draw of ceil(n / 32)
    # int32 words per copy, sign j of word w for element 32 w + j (unpacked here in NumPy)
    seeds = tf.random.experimental.stateless_split(copies_seed, len(params))
    copies = [[], []]
    for i, p in enumerate(params):
        n = int(np.prod(p.shape))
        words = tf.random.stateless_uniform([2, -(-n // 32)], seeds[i], None, None, tf.int32,
                                            alg="philox").numpy().view(np.uint32)
        bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
        signs = 2.0 * bits.reshape(2, -1)[:, :n] - 1.0
        for k in range(2):
            copies[k].append(p + sigma * tf.constant(signs[k].reshape(p.shape)))

    def objective(phi_):
        losses = tf.stack([fewshot.episode_loss(c, seen, N_WAY, phi_, noise_seed)
                           for c in copies])
        w = tf.nn.softmax(-losses / tau)
        combined = [w[0] * a + w[1] * b for a, b in zip(*copies)]
        return fewshot.episode_loss(combined, unseen, N_WAY)

    for got, want in zip(result.hypergrad, finite_difference(objective, phi)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_a_meta_step_moves_phi_by_adams_first_step_then_trains_the_encoder():
    # sigma and tau large enough that the float32 hypergradient of this tiny encoder stands
    # well above rounding (eager and compiled evaluations then agree on its sign)
    t = trainer(km.EvoGrad(2, 0.05, 0.5, noise="rademacher"), lr=0.01)
    rng = np.random.default_rng(0)
    seen = (tf.constant(rng.random((4, SIZE, SIZE, 1), np.float32)),
            tf.constant(rng.random((4, SIZE, SIZE, 1), np.float32)),
            tf.constant(np.repeat(np.arange(2), 2).astype(np.int32)))
    unseen = tuple(tf.constant(a) for a in (rng.random((4, SIZE, SIZE, 1), np.float32),
                                            rng.random((4, SIZE, SIZE, 1), np.float32),
                                            np.repeat(np.arange(2), 2).astype(np.int32)))
    step_seed = tf.constant([0, 0], tf.int64)
    noise_seed, estimator_seed = tf.unstack(tf.random.experimental.stateless_split(step_seed, 2))
    phi_before = t.transforms.hparams()
    expected = t.estimator(t.problem(), t.encoder.values(), phi_before, seen + (noise_seed,),
                           unseen, seed=estimator_seed).hypergrad
    before = t.encoder.values()
    t.train_step(seen, unseen)
    for old, new, g in zip(phi_before, t.transforms.hparams(), expected):
        g = g.numpy()
        moved = np.abs(g) > 1e-6
        np.testing.assert_allclose((new - old).numpy()[moved], -0.01 * np.sign(g[moved]),
                                   rtol=1e-3)
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(before, t.encoder.values()))
    with pytest.raises(ValueError, match="pseudo-unseen episode"):
        t._train_step(seen)


def test_trainer_settings_are_checked():
    encoder = fewshot.ConvEncoder(width=3, blocks=2)
    with pytest.raises(ValueError, match="together"):
        fewshot.PrototypicalTrainer(encoder, n_way=2, estimator=km.EvoGrad())
    with pytest.raises(ValueError, match="transforms has 3 layers"):
        fewshot.PrototypicalTrainer(encoder, n_way=2, transforms=FeatureWiseTransforms([3] * 3))
    with pytest.raises(ValueError, match="width"):
        fewshot.ConvEncoder(width=0)
