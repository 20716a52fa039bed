"""In-process checks of apps/digits_reweighting.py's bilevel problem, run by
tests/apps/test_digits_reweighting.py in a subprocess (importing the app defines its absl
flags, which would clash with other modules' flags in the test process).

Reference: a NumPy transcription of the losses in float64 (the MLP relu(x W1 + b1) W2 + b2,
the cross-entropy, the weights sigmoid(logit) or the Meta-Weight-Net
sigmoid(relu(l K1 + c1) K2 + c2) of each example's loss, the mean of weight x loss for the
logits and sum v l / sum v for the MWN, and the baselines' weights 1/2 and 1/N).
"""

import numpy as np
import pytest
import tensorflow as tf

from apps import digits_reweighting as app
from keras_metapt import functional
import keras_metapt as km


def numpy_losses(params, x, y):
    w1, b1, w2, b2 = [np.asarray(p, np.float64) for p in params]
    logits = np.maximum(x @ w1 + b1, 0.0) @ w2 + b2
    logits = logits - logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_softmax[np.arange(len(y)), y]


def numpy_mwn(hparams, losses):
    k1, c1, k2, c2 = [np.asarray(h, np.float64) for h in hparams]
    hidden = np.maximum(losses[:, None] @ k1 + c1, 0.0)
    return 1.0 / (1.0 + np.exp(-((hidden @ k2)[:, 0] + c2)))


@pytest.fixture(scope="module")
def setup():
    (x, y), _, _, _ = app.load_noisy_digits(100, 0.4, seed=0)
    tf.keras.utils.set_random_seed(0)
    model = app.build_model(16)
    trainable, non_trainable = functional.model_state(model)
    params = [tf.convert_to_tensor(p) for p in trainable]
    index = np.arange(0, 100, 5)
    return model, non_trainable, params, (x[index], y[index], index)


def test_logits_weighting_is_the_mean_of_sigmoid_weight_times_loss(setup):
    model, non_trainable, params, batch = setup
    problem, _, _ = app.make_problem(model, non_trainable, "logits")
    logits = np.random.default_rng(1).normal(size=100).astype(np.float32)
    got = float(problem.inner_loss(params, [tf.constant(logits)], batch))
    x, y, index = batch
    losses = numpy_losses(params, x.astype(np.float64), y)
    want = np.mean(losses / (1.0 + np.exp(-logits[index].astype(np.float64))))
    assert got == pytest.approx(want, rel=1e-5)


def test_mwn_weighting_weighs_the_losses_it_is_given(setup):
    model, non_trainable, params, batch = setup
    problem, _, per_example = app.make_problem(model, non_trainable, "mwn")
    hparams = km.hyper.MetaWeightNet(8, seed=2).hparams()
    x, y, index = batch
    losses = numpy_losses(params, x.astype(np.float64), y)
    np.testing.assert_allclose(per_example(params, x, y).numpy(), losses, rtol=1e-5)
    # the batch's own losses (--mwn_input=evaluated)
    got = float(problem.inner_loss(params, hparams, batch))
    v = numpy_mwn(hparams, losses)
    assert got == pytest.approx(np.sum(v * losses) / np.sum(v), rel=1e-5)
    # losses given with the batch (--mwn_input=current): they set the weights only
    given = np.linspace(0.1, 3.0, len(y)).astype(np.float32)
    got = float(problem.inner_loss(params, hparams, (*batch, tf.constant(given))))
    v = numpy_mwn(hparams, given.astype(np.float64))
    want = np.sum(v * losses) / np.sum(v)
    assert got == pytest.approx(want, rel=1e-5)
    # the weights are constants of the loss in the parameters: d/dparams is the weighted
    # gradient, not the weighted gradient plus a term through the MWN's input
    with tf.GradientTape() as tape:
        tape.watch(params)
        evaluated = problem.inner_loss(params, hparams, batch)
    v = tf.constant(numpy_mwn(hparams, losses), tf.float32)
    with tf.GradientTape() as tape2:
        tape2.watch(params)
        fixed = tf.reduce_sum(v * per_example(params, x, y)) / tf.reduce_sum(v)
    for a, b in zip(tape.gradient(evaluated, params), tape2.gradient(fixed, params)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-7)


def test_uniform_baselines_weigh_every_example_one_half_or_one_nth(setup):
    model, non_trainable, params, batch = setup
    _, _, per_example = app.make_problem(model, non_trainable, "mwn")
    x, y, _ = batch
    mean = np.mean(numpy_losses(params, x.astype(np.float64), y))
    assert float(app.uniform_loss(per_example)(params, batch)) == pytest.approx(0.5 * mean,
                                                                                rel=1e-5)
    assert float(app.uniform_loss(per_example, "mwn")(params, batch)) == pytest.approx(
        mean, rel=1e-5)
