r"""Meta-learn per-example loss weights on noisy digits (scikit-learn's 8x8 digits).

A fraction of the training labels is replaced by random classes. Each outer step
trains the MLP for --inner_steps SGD steps on the weighted training loss and
takes a hypergradient of the clean validation loss with respect to what sets the
weights; Adam updates it. --weighting=logits (default): 1 weight logit per training
example, weight sigmoid(logit) (1,000 hyperparameters). --weighting=mwn: a
Meta-Weight-Net (Shu et al. 2019; loss -> weight, one hidden layer of --mwn_hidden
units, 3H + 1 hyperparameters) shared by every example, whose input is each example's
loss (--mwn_input says at which weights). The training loss is the mean of weight x
loss for the logits and, as in the original Meta-Weight-Net, sum_i v_i l_i / sum_i v_i
for the MWN (normalised: the MWN cannot rescale the step by raising every weight). A
baseline with uniform weights is trained identically (same steps, same
initialisation; weights 1/2, the logits' initial weight, or the normalised uniform
weights 1/N), so the printed validation losses compare like with like.

    python apps/digits_reweighting.py                    # about 10 seconds on 2 CPU cores
    python apps/digits_reweighting.py --estimator=evograd --outer_steps=300
    python apps/digits_reweighting.py --weighting=mwn --hyper_lr=0.001

Writes <output_dir>/history.csv, summary.json and reweighting.png; checkpoints
every --checkpoint_every outer steps and resumes from the latest checkpoint when
run again with the same --output_dir and settings (other settings, or --noresume, start
over). --seed fixes the run (apps/runner.py seeds it and enables op determinism).

--strategy=mirrored|multiworker|tpu computes each hypergradient data-parallel: every replica
holds a contiguous shard of the training and validation sets (and the weight logits of its
examples), and gradients, HVPs and hypergradients are summed across replicas
(keras_metapt.distribute); the result equals the one-device hypergradient.
"""

import csv
import dataclasses
import os
import sys
import time
from typing import Optional

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make `apps` importable
    sys.path.insert(0, ROOT)

import keras_metapt as km  # noqa: E402  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from keras_metapt import functional, optim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("estimator", "unrolled", ["unrolled", "implicit", "evograd", "hyperdistill"],
                  "Hypergradient estimator: reverse-mode through the inner steps, IFT with a "
                  "Neumann series at the current parameters, first-order EvoGrad, or the online "
                  "HyperDistill (one inner step per outer step: needs --inner_steps=1).")
flags.DEFINE_integer("outer_steps", 150, "Number of hypergradient (outer) steps.")
flags.DEFINE_integer("inner_steps", 5, "Inner SGD steps per outer step (unrolled: the horizon T).")
flags.DEFINE_integer("truncate", None, "Unrolled only: differentiate through the last K inner "
                     "steps (1 = greedy one-step); default all.")
flags.DEFINE_float("inner_lr", 0.5, "Inner SGD learning rate.")
flags.DEFINE_float("hyper_lr", 0.1, "Adam learning rate on the weight logits, or on the "
                   "Meta-Weight-Net's weights (0.001 suits --weighting=mwn: 0.1 saturates it).")
flags.DEFINE_enum("weighting", "logits", ["logits", "mwn"], "What is meta-learned: one weight "
                  "logit per training example (weight sigmoid(logit)), or a Meta-Weight-Net "
                  "(per-example loss -> weight) shared by every example.")
flags.DEFINE_integer("mwn_hidden", 100, "--weighting=mwn: hidden units of the Meta-Weight-Net "
                     "(the original's 100).")
flags.DEFINE_enum("mwn_input", "current", ["current", "evaluated"], "--weighting=mwn: the "
                  "losses the Meta-Weight-Net weighs inside a hypergradient: those of the current "
                  "weights (one extra forward pass per outer step), or those at the weights the "
                  "inner loss is evaluated at (each unrolled step; HyperDistill's distilled "
                  "point). The one-step look-ahead, and the training steps themselves, are the "
                  "same with both.")
flags.DEFINE_float("label_noise", 0.4, "Fraction of training labels replaced by a random class.")
flags.DEFINE_integer("num_train", 1000, "Training examples (the rest: 300 validation, test).")
flags.DEFINE_integer("hidden", 64, "Hidden units of the MLP 64-hidden-10.")
flags.DEFINE_integer("seed", 0, "Seed for the split, the label noise and the initialisation; "
                     "it fixes the run (bit-identical on CPU).")
flags.DEFINE_integer("log_every", 10, "Print a line every this many outer steps.")
flags.DEFINE_string("output_dir", "runs/digits_reweighting", "Where history, plot and "
                    "checkpoints go.")
flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint every this many outer steps (0: never).")
flags.DEFINE_bool("resume", True, "Resume from the latest checkpoint in --output_dir (when it "
                  "was made with the same settings; --outer_steps may grow).")
runner.define_strategy_flags("each hypergradient")
runner.define_hyperdistill_flags("--estimator=hyperdistill", every_default=100)
flags.adopt_module_key_flags(runner)
flags.DEFINE_bool("plot", True, "Write reweighting.png (validation loss curves and the learned "
                  "weights of clean vs corrupted examples).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.Config):
    """The flags of this app (see --helpshort)."""

    estimator: str
    outer_steps: int
    inner_steps: int
    truncate: Optional[int]
    hyperdistill_gamma: float
    hyperdistill_every: int
    hyperdistill_reference_steps: int
    hyperdistill_anchor_every: int
    inner_lr: float
    hyper_lr: float
    weighting: str
    mwn_hidden: int
    mwn_input: str
    label_noise: float
    num_train: int
    hidden: int
    seed: int
    log_every: int
    checkpoint_every: int
    plot: bool

    # a resumed run may go on to more outer steps
    NOT_IN_RESULTS = runner.Config.NOT_IN_RESULTS + ("outer_steps", "log_every",
                                                     "checkpoint_every", "plot")
    BOUNDS = {"outer_steps": "[1, inf)", "inner_steps": "[1, inf)", "truncate": "[1, inf)",
              **runner.HYPERDISTILL_BOUNDS,
              "inner_lr": "(0, inf)", "hyper_lr": "[0, inf)", "mwn_hidden": "[1, inf)",
              "label_noise": "[0, 1]", "num_train": "[10, 1496]", "hidden": "[1, inf)",
              "seed": "[0, inf)", "log_every": "[1, inf)", "checkpoint_every": "[0, inf)"}
    MWN_SETTINGS = ("weighting", "mwn_hidden", "mwn_input")

    def results_config(self):
        """The runner's, without the Meta-Weight-Net's settings for the logits (which never
        read them): a logits run resumes whatever they say, as it did before they existed."""
        config = super().results_config()
        if self.weighting == "logits":
            for name in self.MWN_SETTINGS:
                config.pop(name)
        return config


def load_noisy_digits(num_train, noise, seed):
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    if num_train + 300 >= len(x):
        raise app.UsageError(f"--num_train={num_train} leaves no test set (digits has {len(x)})")
    train = slice(0, num_train)
    val = slice(num_train, num_train + 300)
    test = slice(num_train + 300, None)
    y_train = y[train].copy()
    corrupted = rng.random(num_train) < noise
    y_train[corrupted] = rng.integers(0, 10, corrupted.sum())
    corrupted &= y_train != y[train]  # a "corruption" to the true class is no corruption
    return (x[train], y_train), (x[val], y[val]), (x[test], y[test]), corrupted


def build_model(hidden):
    """The MLP; its initialisation comes from the seed set by `runner.seed_everything`."""
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(10)], name="digits_mlp")


def make_problem(model, non_trainable, weighting="logits"):
    """Weighted training loss and clean validation loss.

    The hyperparameters are [weight logits [N]] (weights sigmoid(logit)) with
    ``weighting="logits"``, or the Meta-Weight-Net's [W1, b1, W2, b2]
    (`km.hyper.meta_weight_net_weights`, its input the detached per-example losses) with
    ``"mwn"``, whose training loss is normalised: sum_i v_i l_i / sum_i v_i (one replica).
    Training batches are (x, y, example index) or, for the MWN weighing given
    losses, (x, y, example index, losses). Returns the problem, ``predict(params, x) -> class
    logits`` and ``per_example(params, x, y) -> losses``.
    """
    def predict(params, x):
        return functional.stateless_apply(model, params, non_trainable, x)[0]

    def per_example(params, x, y):
        # Sparse softmax cross-entropy as log-softmax and a one-hot select: under op
        # determinism TensorFlow's sparse kernel becomes a gather whose gradient inside the
        # unrolled loop XLA cannot compile; these plain ops compile and are deterministic.
        return -tf.reduce_sum(tf.one_hot(y, 10) * tf.nn.log_softmax(predict(params, x)), axis=-1)

    # Batches are (x, y, example index); with several replicas each loss is the replica's
    # share of the global mean (shard_fraction is 1 on one device).
    def inner_loss(p, h, b):
        x, y, index = b[:3]
        losses = per_example(p, x, y)
        if weighting == "mwn":
            weights = km.hyper.meta_weight_net_weights(h, b[3] if len(b) > 3 else losses)
            return km.hyper.normalised_weighted_loss(losses, weights)
        weights = tf.sigmoid(tf.gather(h[0], index))
        return km.distribute.shard_fraction(x) * tf.reduce_mean(weights * losses)

    def outer_loss(p, h, b):
        x, y = b[0], b[1]
        return km.distribute.shard_fraction(x) * tf.reduce_mean(per_example(p, x, y))

    return km.BilevelProblem(inner_loss, outer_loss), predict, per_example


def uniform_loss(per_example, weighting="logits"):
    """The baseline's training loss ``loss(params, batch)``: the mean loss with every weight
    1/2 (sigmoid(0), the logits' start), or with the MWN's normalised uniform weights 1/N."""
    scale = 1.0 if weighting == "mwn" else 0.5

    def loss(p, b):
        x, y = b[0], b[1]
        return km.distribute.shard_fraction(x) * tf.reduce_mean(scale * per_example(p, x, y))
    return loss


def make_estimator(config, reduce=None):
    name, inner_steps, inner_lr = config.estimator, config.inner_steps, config.inner_lr
    if name == "hyperdistill":
        return runner.hyperdistill_estimator(config, inner_lr, reduce)
    if name == "unrolled":
        return km.Unrolled(optim.sgd(inner_lr), num_steps=inner_steps, truncate=config.truncate,
                           gradient_reduction=reduce)
    if name == "implicit":
        return km.Implicit(km.linalg.neumann(inner_steps, alpha=inner_lr),
                           gradient_reduction=reduce)
    return km.EvoGrad(num_copies=4, sigma=0.05, temperature=0.05, gradient_reduction=reduce)


def main(argv):
    del argv
    config, strategy = runner.setup(Config)
    runner.seed_everything(config.seed)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te), corrupted = load_noisy_digits(
        config.num_train, config.label_noise, config.seed)
    model = build_model(config.hidden)
    trainable, non_trainable = functional.model_state(model)
    problem, predict, per_example = make_problem(model, non_trainable, config.weighting)
    replicas = strategy.num_replicas_in_sync
    if config.weighting == "mwn" and replicas > 1:
        raise app.UsageError(f"--weighting=mwn runs on one replica (its normalised loss "
                             f"divides by the sum of every weight); got {replicas} replicas")
    if config.estimator == "hyperdistill" and config.inner_steps != 1:
        raise app.UsageError(f"--estimator=hyperdistill takes one inner step per outer step "
                             f"(an online hypergradient); got --inner_steps={config.inner_steps}")
    try:
        estimator = make_estimator(config, km.distribute.replica_sum if replicas > 1 else None)
    except ValueError as error:
        raise app.UsageError(f"--estimator={config.estimator}: {error}") from None
    if replicas > 1:
        print(f"{replicas} replicas ({config.strategy}): each hypergradient is data-parallel")
    sgd = optim.sgd(config.inner_lr)

    # State: meta-learned run (params; logits or MWN weights), uniform baseline (params),
    # hyper-optimizer.
    params = [tf.Variable(t) for t in trainable]
    baseline = [tf.Variable(t) for t in trainable]
    if config.weighting == "mwn":
        hyper_vars = km.hyper.MetaWeightNet(config.mwn_hidden, seed=config.seed).weight_variables()
        items = {"mwn": hyper_vars}
    else:
        hyper_vars = [tf.Variable(tf.zeros([config.num_train]), name="example_weight_logits")]
        items = {"logits": hyper_vars[0]}
    hyper_opt = keras.optimizers.Adam(config.hyper_lr)
    hyper_opt.build(hyper_vars)
    step = tf.Variable(0, dtype=tf.int64)
    if config.estimator == "hyperdistill":  # keeps w_0, the step count and its scale's fit
        items.update(estimator.start([p.read_value() for p in params]).checkpoint_items())
    ckpt = tf.train.Checkpoint(params=params, baseline=baseline, step=step, hyper_opt=hyper_opt,
                               **items)
    os.makedirs(config.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(config.output_dir, "ckpt")
    resumable = runner.claim_directory(ckpt_dir, config)
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, 2)
    history_path = os.path.join(config.output_dir, "history.csv")
    if resumable and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        print(f"Resumed from {manager.latest_checkpoint} at outer step {int(step.numpy())}")
        truncate_history(history_path, int(step.numpy()))
    else:
        with open(history_path, "w", newline="") as f:
            csv.writer(f).writerow(["outer_step", "val_loss_meta", "val_loss_uniform"])

    train = (x_tr, y_tr, np.arange(len(x_tr)))
    val = (x_val, y_val)

    def hparams():
        return [tf.convert_to_tensor(v) for v in hyper_vars]

    def hypergradient(train_batch, val_batch):
        # EvoGrad's noise seed: a function of the step, the same on every replica (the other
        # estimators ignore it).
        seed = tf.stack([tf.constant(config.seed, tf.int64), step.read_value()])
        current = [p.read_value() for p in params]
        if config.weighting == "mwn" and config.mwn_input == "current":
            train_batch = (*train_batch, per_example(current, train_batch[0], train_batch[1]))
        return estimator(problem, current, hparams(), train_batch, val_batch, seed=seed)

    if replicas == 1:
        meta_step = tf.function(lambda: hypergradient(train, val), jit_compile=True)
    else:
        train_shards = km.distribute.shard_for_replicas(strategy, train)
        val_shards = km.distribute.shard_for_replicas(strategy, val)

        @tf.function  # XLA does not compile across devices
        def meta_step():
            per_replica = strategy.run(hypergradient, args=(train_shards, val_shards))
            # the reduced result is identical on every replica: take the first
            return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                         per_replica)

    baseline_loss = uniform_loss(per_example, config.weighting)

    @tf.function(jit_compile=True)
    def baseline_steps():
        state = [p.read_value() for p in baseline]
        for _ in range(config.inner_steps):
            with tf.GradientTape() as tape:
                tape.watch(state)
                loss = baseline_loss(state, train)
            state, _ = sgd.update(tape.gradient(loss, state), (), state)
        return state, problem.outer_loss(state, None, val)

    def inner_sgd_steps():
        """EvoGrad and IFT do not move the parameters: train them with the current weights."""
        state = [p.read_value() for p in params]
        for _ in range(config.inner_steps):
            with tf.GradientTape() as tape:
                tape.watch(state)
                loss = problem.inner_loss(state, hparams(), train)
            state, _ = sgd.update(tape.gradient(loss, state), (), state)
        return state

    inner_sgd_steps = tf.function(inner_sgd_steps, jit_compile=True)
    progbar = keras.utils.Progbar(config.outer_steps, unit_name="outer step")
    progbar.update(int(step.numpy()))
    print(f"{'step':>6} {'val loss (meta-learned weights)':>32} {'val loss (uniform weights)':>28}")
    with open(history_path, "a", newline="") as f:
        writer = csv.writer(f)
        step_seconds = []
        while int(step.numpy()) < config.outer_steps:
            started = time.perf_counter()
            result = km.ensure_finite(meta_step())
            hyper_opt.apply_gradients(zip(result.hypergrad, hyper_vars))
            if config.estimator in ("unrolled", "hyperdistill"):
                new_params = result.params
            else:
                new_params = inner_sgd_steps()
            for var, value in zip(params, new_params):
                var.assign(value)
            step_seconds.append(time.perf_counter() - started)  # the meta-learned run's step
            base_params, base_val = baseline_steps()
            for var, value in zip(baseline, base_params):
                var.assign(value)
            step.assign_add(1)
            s = int(step.numpy())
            meta_val = float(problem.outer_loss([p.read_value() for p in params], None, val))
            writer.writerow([s, f"{meta_val:.5f}", f"{float(base_val):.5f}"])
            if s % config.log_every == 0 or s == config.outer_steps:
                f.flush()
                sys.stdout.write("\n")
                print(f"{s:>6} {meta_val:>32.4f} {float(base_val):>28.4f}")
            progbar.update(s)
            if config.checkpoint_every and s % config.checkpoint_every == 0:
                f.flush()
                manager.save(checkpoint_number=s)

    if config.weighting == "mwn":  # the MWN's output v at each example's final loss (the
        # normalised loss weighs by v / sum v)
        weights = km.hyper.meta_weight_net_weights(hparams(), per_example(
            [p.read_value() for p in params], x_tr, y_tr)).numpy()
    else:
        weights = tf.sigmoid(hyper_vars[0]).numpy()
    summary = summarise(problem, predict, params, baseline, weights, (x_te, y_te), val,
                        corrupted)
    # the mean over the steps after the first (which traces and compiles); it includes any
    # periodic work (HyperDistill's references)
    summary["seconds_per_outer_step"] = (float(np.mean(step_seconds[1:] or step_seconds))
                                         if step_seconds else None)
    summary["inner_steps_total"] = config.outer_steps * config.inner_steps
    if config.estimator == "hyperdistill":
        summary["hyperdistill_scale"] = float(estimator.scale)
        summary["hyperdistill_references"] = int(estimator.state.references.numpy())
    runner.write_json(os.path.join(config.output_dir, "summary.json"), summary)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    if config.plot:
        plot(history_path, weights, corrupted, config.weighting,
             os.path.join(config.output_dir, "reweighting.png"))


def summarise(problem, predict, params, baseline, weights, test, val, corrupted):
    """Losses and accuracies of both runs; ``weights`` [N], the learned weight of every
    training example (sigmoid(logit), or the MWN's output v, whose scale the normalised loss
    ignores), by clean against corrupted: the means and the AUROC."""
    from sklearn.metrics import roc_auc_score

    def accuracy(state, data):
        return float(np.mean(np.argmax(predict(state, data[0]).numpy(), -1) == data[1]))

    meta = [p.read_value() for p in params]
    base = [p.read_value() for p in baseline]
    return {
        "val_loss_meta": round(float(problem.outer_loss(meta, None, val)), 4),
        "val_loss_uniform": round(float(problem.outer_loss(base, None, val)), 4),
        "test_loss_meta": round(float(problem.outer_loss(meta, None, test)), 4),
        "test_loss_uniform": round(float(problem.outer_loss(base, None, test)), 4),
        "test_accuracy_meta": round(accuracy(meta, test), 4),
        "test_accuracy_uniform": round(accuracy(base, test), 4),
        "val_accuracy_meta": round(accuracy(meta, val), 4),
        "val_accuracy_uniform": round(accuracy(base, val), 4),
        "mean_weight_clean": round(float(weights[~corrupted].mean()), 4),
        "mean_weight_corrupted": round(float(weights[corrupted].mean()), 4),
        "auroc_weights_vs_clean": round(float(roc_auc_score(~corrupted, weights)), 4),
    }


def truncate_history(history_path, last_step):
    """Drops the history rows after ``last_step`` (written after the checkpoint a resumed run
    restarts from; the resumed run writes them again). Atomic, like the checkpoints."""
    with open(history_path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    tmp = f"{history_path}.tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, history_path)


def plot(history_path, weights, corrupted, weighting, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(history_path)))
    steps = [int(r["outer_step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [float(r["val_loss_uniform"]) for r in rows], label="uniform weights")
    ax1.plot(steps, [float(r["val_loss_meta"]) for r in rows], label="meta-learned weights")
    ax1.set_xlabel("outer step")
    ax1.set_ylabel("clean validation loss")
    ax1.legend()
    ax1.set_title("Validation loss")
    bins = np.linspace(0, 1 if weighting == "logits" else max(float(weights.max()), 1e-6), 31)
    ax2.hist(weights[~corrupted], bins, alpha=0.6, label="clean label")
    ax2.hist(weights[corrupted], bins, alpha=0.6, label="corrupted label")
    ax2.set_xlabel("learned example weight sigmoid(logit)" if weighting == "logits" else
                   "Meta-Weight-Net output v at the example's final loss")
    ax2.set_ylabel("examples")
    ax2.legend()
    ax2.set_title("Learned weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"Wrote {path}")


if __name__ == "__main__":
    app.run(main)
