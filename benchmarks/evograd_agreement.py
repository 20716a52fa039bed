r"""How far is one EvoGrad hypergradient from the one-step hypergradient it estimates?

    python -m benchmarks.evograd_agreement                     # ~4 min on 2 CPU cores
    python -m benchmarks.evograd_agreement --copies=2,8 --draws=32

To first order in sigma, EvoGrad's hypergradient of the Meta-Weight-Net weights phi is

    -(1 / tau) sum_k w_k (g_meta . eps_k) J^T (eps_k - sum_j w_j eps_j),  J = d grad_theta L / dphi,

whose mean over the noise eps is -eta J^T g_meta, eta = sigma^2 (K - 1) / (K tau): the one-step
look-ahead hypergradient at rate eta (`EvoGrad.effective_learning_rate`). Each copy's weights
come from that copy's losses, so grad_theta L here includes the path through the MWN's input
("live"); the original Meta-Weight-Net, and the app's mwn_one_step arm, stop it ("stopped").
One draw projects g_meta onto K random directions in the space of all the network's weights,
so its agreement with the mean is low and grows with K. This benchmark measures it on the
problem of apps/noisy_labels.py (every flag of the app applies: --network, --width,
--evograd_sigma, ...; with --mwn_input=current every copy is weighed at the current weights'
losses, and EvoGrad's mean is the stopped reference; with --mwn_input=copies_mean at the mean
of the copies' losses, the same to first order in sigma).

For each state in --states (epochs of MWN training with the one-step hypergradient from the
seed's initialisation, as the app's mwn_one_step arm trains) and each of --batches (noisy
batch, clean meta batch) pairs, it computes two references -- `Unrolled(sgd, 1)` at the rate
eta on the stopped and on the live inner loss -- and --draws EvoGrad hypergradients per K in
--copies, each from its own noise seed, and reports, averaged over states and pairs: the
cosine of one draw with each reference, the share of the phi coordinates whose sign agrees
with the stopped reference's (Adam moves each coordinate by about its sign), the cosine of
the mean of the draws with each reference and the mean's projection on it relative to it (1:
unbiased in scale), and the time of one call. Per state also the cosine of the app's one-step
hypergradient -- the look-ahead at the current SGD rate -- with the stopped reference and with
the mean of the EvoGrad draws: they estimate the same thing only where one SGD step is small
enough for the meta gradient not to change along it.

Writes benchmarks/results/evograd_agreement.{md,json} (or --results_dir).
"""

import dataclasses
import os
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras_metapt as km  # noqa: E402
from apps import runner  # noqa: E402
from apps import noisy_labels as app_module  # noqa: E402  (defines the app's flags)
from keras_metapt import optim  # noqa: E402
from keras_metapt.hyper.example_weights import (  # noqa: E402
    meta_weight_net_weights, normalised_weighted_loss)

FLAGS = flags.FLAGS
flags.DEFINE_list("copies", ["2", "4", "8", "16", "32"], "EvoGrad's K values to measure.")
flags.DEFINE_integer("draws", 64, "EvoGrad hypergradients per (state, batch pair, K).")
flags.DEFINE_list("states", ["0", "10", "30", "45"], "Epochs of one-step MWN training before each "
                  "measurement (at the app's SGD rate and schedule).")
flags.DEFINE_integer("batches", 3, "(noisy batch, meta batch) pairs per state.")
flags.DEFINE_integer("seed", 0, "Seed of the network, the MWN, the batch order and the noise.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where evograd_agreement.md and .json are written.")


def flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).ravel() for t in tensors])


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def live_input_problem(trainer):
    """The trainer's bilevel problem with the inner loss differentiated through the MWN's
    input too: the total derivative in theta of sum_i l_i v(l_i) / sum_i v(l_i), which is what
    EvoGrad's copies see (each copy's weights come from that copy's losses)."""
    def inner_loss(params, mwn, batch):
        values = trainer.example_losses(params, batch)
        weights = meta_weight_net_weights(mwn, values, stop_loss_gradient=False)
        return normalised_weighted_loss(values, weights)

    return dataclasses.replace(trainer.problem(), inner_loss=inner_loss)


def train_epochs(trainer, data, config, seed, first, last):
    """Epochs [first, last) of the app's training loop (its batch order and meta batches)."""
    steps = -(-len(data.x_train) // config.batch_size)
    for epoch in range(first, last):
        trainer.optimizer.learning_rate = app_module.learning_rate_at(epoch, config)
        order = app_module.batch_order(seed, epoch, len(data.x_train), config.batch_size, steps)
        meta_rng = np.random.default_rng([app_module.META_TAG, seed, epoch])
        for rows in order:
            meta_rows = meta_rng.choice(len(data.x_meta), config.batch_size, replace=False)
            trainer.train_step((data.x_train[rows], data.y_train[rows]),
                               (data.x_meta[meta_rows], data.y_meta[meta_rows]))


def measure_state(trainer, data, config, seed, epoch, copies, draws, num_pairs):
    """Per K, the agreement figures at the trainer's current state, over ``num_pairs`` pairs."""
    problem = trainer.problem()
    params = [v.value for v in trainer.model.trainable_variables]
    phi = trainer.mwn.hparams()
    rng = np.random.default_rng([7, seed, epoch])
    pairs = []
    for _ in range(num_pairs):
        rows = rng.choice(len(data.x_train), config.batch_size, replace=False)
        meta_rows = rng.choice(len(data.x_meta), config.batch_size, replace=False)
        pairs.append(((tf.constant(data.x_train[rows]), tf.constant(data.y_train[rows])),
                      (tf.constant(data.x_meta[meta_rows]), tf.constant(data.y_meta[meta_rows]))))
    one_step = km.Unrolled(optim.sgd(config.lr), num_steps=1)
    reference_fn = tf.function(lambda b, m: one_step(problem, params, phi, b, m).hypergrad)

    # the app's mwn_evograd problem (the trainer is mwn_one_step's, whose input is "evaluated")
    mwn_input = app_module.mwn_input_of("mwn_evograd", config.mwn_input)

    def evograd_problem(batch):
        if mwn_input == "current":  # every copy weighed at the current losses
            return trainer.problem(tf.stop_gradient(trainer.example_losses(params, batch)))
        return trainer.problem(mwn_input=mwn_input)
    live = live_input_problem(trainer)
    live_fn = tf.function(lambda b, m: one_step(live, params, phi, b, m).hypergrad)
    lr_now = float(trainer.optimizer.learning_rate.numpy())
    at_lr_of_pair = [flat(reference_fn(b, m)) for b, m in pairs]  # the app's one-step: any K
    rows = {}
    for K in copies:
        estimator = km.EvoGrad(num_copies=K, sigma=config.evograd_sigma,
                               temperature=config.evograd_temperature, noise=config.evograd_noise)
        evograd_fn = tf.function(lambda b, m, s: estimator(evograd_problem(b), params, phi, b,
                                                           m, seed=s).hypergrad)
        eta = estimator.effective_learning_rate
        single, signs, of_mean, scale, app_cos, mean_at_lr, seconds = [], [], [], [], [], [], []
        live_single, live_of_mean, live_scale, live_vs_stopped = [], [], [], []
        for p, (batch, meta_batch) in enumerate(pairs):
            trainer.optimizer.learning_rate = eta   # the look-ahead's rate: EvoGrad's eta
            reference = flat(reference_fn(batch, meta_batch))
            live_reference = flat(live_fn(batch, meta_batch))
            trainer.optimizer.learning_rate = lr_now
            at_lr = at_lr_of_pair[p]
            app_cos.append(cosine(at_lr, reference))
            evograd_fn(batch, meta_batch, tf.constant([seed, 0], tf.int64))  # trace
            samples = []
            for d in range(draws):
                s = tf.constant([seed * 1000 + p, d], tf.int64)
                start = time.perf_counter()
                g = evograd_fn(batch, meta_batch, s)
                samples.append(flat(g))
                seconds.append(time.perf_counter() - start)
            samples = np.array(samples)
            single += [cosine(x, reference) for x in samples]
            signs += [float(np.mean(np.sign(x) == np.sign(reference))) for x in samples]
            mean = samples.mean(0)
            of_mean.append(cosine(mean, reference))
            mean_at_lr.append(cosine(mean, at_lr))
            live_single += [cosine(x, live_reference) for x in samples]
            live_of_mean.append(cosine(mean, live_reference))
            live_scale.append(float(mean @ live_reference / (live_reference @ live_reference)))
            live_vs_stopped.append(cosine(live_reference, reference))
            scale.append(float(mean @ reference / (reference @ reference)))
        rows[K] = {"eta": eta, "cosine_single": float(np.mean(single)),
                   "cosine_single_std": float(np.std(single)),
                   "sign_agreement_single": float(np.mean(signs)),
                   "cosine_of_mean": float(np.mean(of_mean)),
                   "scale_of_mean": float(np.mean(scale)),
                   "ms_per_call": 1e3 * float(np.median(seconds)),
                   "one_step_at_lr_cosine": float(np.mean(app_cos)),
                   "cosine_of_mean_with_one_step_at_lr": float(np.mean(mean_at_lr)),
                   "live_cosine_single": float(np.mean(live_single)),
                   "live_cosine_of_mean": float(np.mean(live_of_mean)),
                   "live_scale_of_mean": float(np.mean(live_scale)),
                   "live_reference_cosine_with_reference": float(np.mean(live_vs_stopped)),
                   "lr": lr_now}
        print(f"  epoch {epoch}, K={K}: {rows[K]}", flush=True)
    return rows


def main(argv):
    del argv
    config = app_module.Config.from_flags()
    copies = [int(k) for k in FLAGS.copies]
    states = sorted(int(s) for s in FLAGS.states)
    if any(k < 2 for k in copies) or any(s < 0 for s in states):
        raise app.UsageError(f"--copies must be >= 2 and --states >= 0; got {FLAGS.copies}, "
                             f"{FLAGS.states}")
    data = app_module.load_data(config)
    tf.keras.utils.set_random_seed(FLAGS.seed)
    trainer = app_module.make_trainer("mwn_one_step", FLAGS.seed, config)
    start, done, results = time.perf_counter(), 0, {}
    for epoch in states:
        train_epochs(trainer, data, config, FLAGS.seed, done, epoch)
        done = epoch
        results[epoch] = measure_state(trainer, data, config, FLAGS.seed, epoch, copies,
                                       FLAGS.draws, FLAGS.batches)
    keys = ("cosine_single", "sign_agreement_single", "cosine_of_mean", "scale_of_mean",
            "ms_per_call", "one_step_at_lr_cosine", "cosine_of_mean_with_one_step_at_lr",
            "live_cosine_single", "live_cosine_of_mean", "live_scale_of_mean",
            "live_reference_cosine_with_reference")
    summary = {K: {k: float(np.mean([results[e][K][k] for e in states])) for k in keys}
               for K in copies}
    lines = ["# EvoGrad against the one-step hypergradient it estimates (Meta-Weight-Net)", "",
             f"`python -m benchmarks.evograd_agreement --draws={FLAGS.draws} --copies="
             f"{','.join(FLAGS.copies)} --states={','.join(FLAGS.states)} --batches="
             f"{FLAGS.batches}"
             + ("" if config.mwn_input == "evaluated" else f" --mwn_input={config.mwn_input}")
             + f"`; network {config.network} (width {config.width}), seed "
             f"{FLAGS.seed}, sigma {config.evograd_sigma}, tau {config.evograd_temperature}, "
             f"{config.evograd_noise} noise; reference: the one-step look-ahead hypergradient "
             f"at EvoGrad's rate eta = sigma^2 (K-1) / (K tau); mean over states (epochs "
             f"{', '.join(map(str, states))} of one-step MWN training) and batch pairs; "
             f"{time.perf_counter() - start:.0f} s.", "",
             "Two references: *stopped*, the look-ahead as the original Meta-Weight-Net (and "
             "the app's mwn_one_step) takes it, with the MWN's input loss a constant; *live*, "
             "the same with the gradient through the MWN's input as well, which is what "
             "EvoGrad's copies see" + (" (here each copy is weighed at the current losses, "
                                       "so EvoGrad's mean is the stopped one)"
                                       if config.mwn_input == "current" else
                                       " (here each copy is weighed at the mean of the copies' "
                                       "losses, so EvoGrad's mean is the stopped one to first "
                                       "order in sigma)"
                                       if config.mwn_input == "copies_mean" else "") + ".", "",
             "| K | one draw: cosine with stopped | sign agreement with stopped | cosine with "
             f"live | mean of {FLAGS.draws} draws: cosine with stopped | its scale on stopped "
             "| cosine with live | its scale on live (1: unbiased) | ms / call |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for K in copies:
        r = summary[K]
        lines.append(f"| {K} | {r['cosine_single']:.3f} | {r['sign_agreement_single']:.3f} | "
                     f"{r['live_cosine_single']:.3f} | {r['cosine_of_mean']:.3f} | "
                     f"{r['scale_of_mean']:.2f} | {r['live_cosine_of_mean']:.3f} | "
                     f"{r['live_scale_of_mean']:.2f} | {r['ms_per_call']:.1f} |")
    lines += ["", "Per state (epochs of one-step MWN training before the measurement). Last "
              "three columns: the live reference against the stopped one, and the app's "
              "one-step hypergradient (a look-ahead at the current SGD rate, stopped) against "
              "the stopped reference and against the mean of the draws:", "",
              "| epochs | SGD rate | K | one draw: cosine with stopped | sign agreement | mean: "
              "cosine with stopped | scale | one draw: cosine with live | mean: cosine with "
              "live | scale | live vs stopped | one-step at the SGD rate vs stopped | vs the "
              "mean of the draws |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in states:
        for K in copies:
            r = results[e][K]
            lines.append(f"| {e} | {r['lr']:g} | {K} | {r['cosine_single']:.3f} | "
                         f"{r['sign_agreement_single']:.3f} | {r['cosine_of_mean']:.3f} | "
                         f"{r['scale_of_mean']:.2f} | {r['live_cosine_single']:.3f} | "
                         f"{r['live_cosine_of_mean']:.3f} | {r['live_scale_of_mean']:.2f} | "
                         f"{r['live_reference_cosine_with_reference']:.3f} | "
                         f"{r['one_step_at_lr_cosine']:.3f} | "
                         f"{r['cosine_of_mean_with_one_step_at_lr']:.3f} |")
    text = "\n".join(lines) + "\n"
    runner.write_report(FLAGS.results_dir, "evograd_agreement", text, {
        "seed": FLAGS.seed, "config": config.results_config(), "copies": copies,
        "states": states, "draws": FLAGS.draws,
        "results": {str(e): {str(K): results[e][K] for K in copies} for e in states},
        "summary": {str(K): summary[K] for K in copies}})
    print(text)


if __name__ == "__main__":
    app.run(main)
