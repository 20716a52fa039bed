"""MetaWeightNetTrainer: the order and content of one Meta-Weight-Net step.

References: for a softmax regression (a Keras Dense layer), NumPy closed forms of the mean and
of the MWN-weighted cross-entropy gradients (sum_i v_i (p_i - y_i) x_i / sum v); the SGD
momentum step written out (first step: theta - lr (g + wd theta)); Adam's first step written
out (phi - lr g / (|g| + eps / sqrt(1 - beta_2))), applied to the hypergradient at the state
before the step, taken by float64 central differences of the NumPy one-step and EvoGrad
objectives of tests/hyper/test_example_weights.py (the look-ahead at the trainer's rate; with
``mwn_input="current"`` EvoGrad's copies weighed by the MWN at the unperturbed losses, written
out below, and with ``"copies_mean"`` at the mean of the copies' losses);
the weighted step must use the MWN after its update; data-parallel on 2 logical CPUs against
the same steps on one device (tests/mwn_data_parallel.py: shards of 5 + 4 and of 1 + 0, SGD
meta optimizer so that any factor on the hypergradient shows, weight decay on); the tensors an
EvoGrad MWN step holds at once against those of a plain step on the same CNN and batch
(`benchmarks.memory.peak_requested_mib`, which is checked against exact tensor sizes).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import nets, optim
from keras_metapt.reweighting import MetaWeightNetTrainer, per_example_cross_entropy
from tests.hyper import test_example_weights as ref
from tests.hyper.test_example_weights import np_cross_entropy


def linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def data(seed=0, n=6):
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)),
            (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)))


def test_plain_step_is_sgd_on_the_mean_cross_entropy():
    model = linear_model()
    theta = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    trainer = MetaWeightNetTrainer(model, learning_rate=0.1, weight_decay=0.01)
    (x, y), meta = data()
    loss, meta_loss = trainer.train_step((tf.constant(x), tf.constant(y)),
                                         tuple(map(tf.constant, meta)))
    assert float(meta_loss) == 0.0
    np.testing.assert_allclose(float(loss), np.mean(np_cross_entropy(theta, x, y)), rtol=1e-5)
    g = ref.np_weighted_gradient(theta, None, x.astype(np.float64), y, v=np.ones(len(y)))
    for var, t, gi in zip(model.trainable_variables, theta, g):
        np.testing.assert_allclose(var.numpy(), t - 0.1 * (gi + 0.01 * t), rtol=1e-5, atol=1e-6)
    assert int(trainer.step.numpy()) == 1


def evograd_objective_shared_losses(mwn_input, theta, train, val, noise, tau):
    """The EvoGrad objective with every copy's losses weighed by the MWN at one shared loss
    per example, m_i: phi -> L_val(sum_k softmax(-L_k / tau)_k theta_k),
    L_k = sum_i l_i(theta_k) v(m_i) / sum_i v(m_i), where m_i = l_i(theta), the unperturbed
    losses (``mwn_input="current"``), or m_i = mean_k l_i(theta_k), the copies' mean
    (``"copies_mean"``)."""
    thetas = [[a + e for a, e in zip(theta, copy)] for copy in noise]
    base = (np_cross_entropy(theta, *train) if mwn_input == "current"
            else np.mean([np_cross_entropy(t, *train) for t in thetas], axis=0))

    def objective(mwn_values):
        v = ref.np_mwn(mwn_values, base)
        losses = np.array([np.sum(np_cross_entropy(t, *train) * v / v.sum()) for t in thetas])
        w = np.exp(-(losses - losses.min()) / tau)
        w /= w.sum()
        combined = [sum(w[k] * t[i] for k, t in enumerate(thetas)) for i in range(2)]
        return np.mean(np_cross_entropy(combined, *val))
    return objective


@pytest.mark.parametrize("call", ["train_step", "hyperstep"])
@pytest.mark.parametrize("method,mwn_input", [
    ("evograd", "evaluated"), ("evograd", "current"), ("evograd", "copies_mean"),
    ("one_step", "evaluated"), ("one_step", "current")])
def test_meta_step_updates_the_mwn_first_then_steps_with_it(method, mwn_input, call):
    """``hyperstep`` alone: the same MWN update, and the model not stepped."""
    model = linear_model(1)
    mwn = km.hyper.MetaWeightNet(hidden=5, seed=2)
    # the look-ahead must take the trainer's rate (0.1), not the estimator's own (123)
    estimator = (km.EvoGrad(num_copies=2, sigma=0.05, temperature=0.1) if method == "evograd"
                 else km.Unrolled(optim.sgd(123.0), num_steps=1))
    trainer = MetaWeightNetTrainer(model, learning_rate=0.1, mwn=mwn,
                                   meta_optimizer=keras.optimizers.Adam(0.01),
                                   estimator=estimator, seed=4, mwn_input=mwn_input)
    train, val = data(1)
    theta = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    phi = [v.numpy().astype(np.float64) for v in mwn.hparams()]
    train64 = (train[0].astype(np.float64), train[1])
    val64 = (val[0].astype(np.float64), val[1])
    if method == "evograd":  # the draws of step 0: stateless seed (trainer seed, step)
        noise = ref.evograd_noise(tf.constant([4, 0], tf.int64), [t.shape for t in theta], 2, 0.05)
        objective = (ref.evograd_objective(theta, train64, val64, noise, 0.1)
                     if mwn_input == "evaluated" else evograd_objective_shared_losses(
                         mwn_input, theta, train64, val64, noise, 0.1))
    else:  # the look-ahead starts at the current weights: the same with either input
        objective = ref.one_step_objective(theta, train64, val64, 0.1)
    expected = ref.central_difference(objective, [p.copy() for p in phi])
    getattr(trainer, call)(tuple(map(tf.constant, train)), tuple(map(tf.constant, val)))
    # Keras Adam's first step: lr sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps)
    eps = 1e-7 / np.sqrt(1 - 0.999)
    new_phi = [p - 0.01 * g / (np.abs(g) + eps) for p, g in zip(phi, expected)]
    for var, want in zip(mwn.hparams(), new_phi):
        np.testing.assert_allclose(var.numpy(), want, rtol=1e-4, atol=1e-5)
    v = ref.np_mwn(new_phi, ref.np_cross_entropy(theta, *train64))
    g = ref.np_weighted_gradient(theta, None, *train64, v)
    if call == "hyperstep":
        g = [0 * gi for gi in g]
    for var, t, gi in zip(model.trainable_variables, theta, g):
        np.testing.assert_allclose(var.numpy(), t - 0.1 * gi, rtol=1e-4, atol=1e-6)


def test_helpers_and_argument_errors():
    logits = tf.constant([[1.0, 2.0, 0.5]])
    np.testing.assert_allclose(per_example_cross_entropy(logits, tf.constant([1])).numpy(),
                               [-np.log(np.exp(2.0) / np.exp([1.0, 2.0, 0.5]).sum())], rtol=1e-6)
    with pytest.raises(ValueError, match="together"):
        MetaWeightNetTrainer(linear_model(), learning_rate=0.1, mwn=km.hyper.MetaWeightNet())
    with pytest.raises(ValueError, match="hyperstep needs a trainer with a Meta-Weight-Net"):
        MetaWeightNetTrainer(linear_model(), learning_rate=0.1).hyperstep(*data())
    with pytest.raises(ValueError, match="mwn_input must be one of"):
        MetaWeightNetTrainer(linear_model(), learning_rate=0.1, mwn_input="copies")
    with pytest.raises(ValueError, match="copies_mean.*needs an EvoGrad estimator, got Unrolled"):
        MetaWeightNetTrainer(linear_model(), learning_rate=0.1, mwn=km.hyper.MetaWeightNet(),
                             meta_optimizer=keras.optimizers.Adam(), mwn_input="copies_mean",
                             estimator=km.Unrolled(optim.sgd(0.1), num_steps=1))
    trainer = MetaWeightNetTrainer(linear_model(), learning_rate=0.1)
    with pytest.raises(ValueError, match="mwn_input must be one of"):
        trainer.problem(mwn_input="copy_mean")
    with pytest.raises(ValueError, match="give no mwn_input_losses"):
        trainer.problem(tf.zeros([3]), mwn_input="copies_mean")
    assert trainer.problem(mwn_input="copies_mean").inner_loss_at_points is not None
    assert trainer.problem().inner_loss_at_points is None
    with pytest.raises(ValueError, match="network must be one of"):
        nets.image_classifier("vgg")
    assert nets.image_classifier("mlp", width=1).output_shape == (None, 10)


def test_data_parallel_steps_equal_the_one_device_steps(tmp_path):
    out = tmp_path / "steps.npz"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.mwn_data_parallel", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = np.load(out)
    every = ("plain", "one_step", "evograd", "implicit", "evograd_current",
             "evograd_copies_mean")
    for n, arms in ((9, every), (1, every[:2])):
        for arm in arms:
            single, mirrored = (f"{arm}_{n}_{name}" for name in ("single", "mirrored"))
            assert np.isfinite(steps[f"{mirrored}_losses"]).all(), (arm, n)
            np.testing.assert_allclose(steps[f"{mirrored}_losses"], steps[f"{single}_losses"],
                                       rtol=1e-5, err_msg=f"{arm}, batch {n}")
            for part in ("weights", "mwn"):
                a, b = steps[f"{single}_{part}"], steps[f"{mirrored}_{part}"]
                if part == "mwn" and (arm == "plain" or n == 1):
                    # a lone example's normalised weight is 1 whatever the MWN: no signal
                    assert np.abs(a).max() <= 1e-5 and np.abs(b).max() <= 1e-5  # round-off
                    continue
                assert np.abs(a).max() > 0
                np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max() + 1e-12,
                                           err_msg=f"{arm}, batch {n}, {part}")


HELD_MEMORY_SCRIPT = """
import json, os
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import keras, numpy as np, tensorflow as tf
import keras_metapt as km
from keras_metapt import nets
from benchmarks.memory import peak_requested_mib
tf.config.threading.set_inter_op_parallelism_threads(1)
rng = np.random.default_rng(0)
batch = (tf.constant(rng.random((256, 28, 28, 1), np.float32)),
         tf.constant(rng.integers(0, 10, 256).astype(np.int32)))
peaks = {}
for method in ("plain", "evograd"):
    keras.utils.set_random_seed(0)
    extra = {} if method == "plain" else dict(
        mwn=km.hyper.MetaWeightNet(100, seed=0), meta_optimizer=keras.optimizers.Adam(1e-3),
        estimator=km.EvoGrad(num_copies=2, sigma=1e-3, temperature=0.05))
    trainer = km.reweighting.MetaWeightNetTrainer(nets.image_classifier("cnn", 4),
                                                  learning_rate=0.05, **extra)
    trainer.train_step(batch, batch)
    peaks[method] = peak_requested_mib(lambda: trainer.train_step(batch, batch)[0].numpy())[0]
print(json.dumps(peaks))
"""


def test_evograd_step_holds_about_what_a_plain_step_holds():
    """The weighted SGD step runs after the hyperstep: its forward's activations are not held
    while EvoGrad's outer gradient runs. Reference: the plain step's peak of held tensors (a
    CNN whose activations outweigh its weights; EvoGrad adds K weight copies and per-example
    vectors). Measured 1.00x; with the two overlapping it was 1.6x."""
    proc = subprocess.run([sys.executable, "-c", HELD_MEMORY_SCRIPT], capture_output=True,
                          text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["evograd"] <= 1.15 * peaks["plain"], peaks
