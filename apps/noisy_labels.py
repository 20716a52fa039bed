r"""Learning from noisy labels with a Meta-Weight-Net (Shu et al. 2019) on Fashion-MNIST, its
hypergradient by EvoGrad (Bohdal et al. 2021), by the original second-order one-step
look-ahead, or by the implicit function theorem.

The training labels (all but a class-balanced clean meta set of --num_meta examples taken from
the training split) are corrupted: --noise=uniform replaces a label, with probability
--noise_rate, by a uniformly drawn class; --noise=flip moves class c to c + 1. The test split
stays clean. Arms, each trained for the same number of SGD steps from the same initialisation
and batch order of a seed:

- uniform: plain cross-entropy on the noisy training set;
- clean_only: cross-entropy on the clean meta set alone;
- mwn_one_step, mwn_evograd, mwn_implicit, mwn_hyperdistill, mwn_lookahead5: the loss of
  each training example is weighted by v_i = MWN(l_i), a 1-100-1 MLP
  (keras_metapt.hyper.MetaWeightNet), with the loss sum_i l_i v_i / sum_i v_i. Every step:
  the hypergradient of the clean meta batch's loss with respect to the MWN weights
  (keras_metapt.Unrolled with one SGD step at the current learning rate, keras_metapt.EvoGrad
  with --evograd_copies copies perturbed by sign noise as in the EvoGrad code (or Gaussian),
  keras_metapt.Implicit with a Neumann series, keras_metapt.HyperDistill -- the online
  hypergradient over the whole run so far, damped by --hyperdistill_gamma, distilled into one
  step VJP -- or the truncated hypergradient of horizon 5: Unrolled through 5 SGD steps on
  the current batch from the current weights), an
  Adam step on them (--meta_lr; epsilon 1e-12, so that the step does not depend on the
  hypergradient's scale, which differs by estimator: EvoGrad's is about sigma^2 / (2 tau lr)
  of the one-step one), then the real SGD step with the updated weights. --mwn_input chooses
  the losses the MWN weighs inside the hypergradient: the current weights' (the default;
  EvoGrad's mean is then the original one-step hypergradient), the mean of EvoGrad's copies'
  losses (the same to first order in sigma, without the forward pass at the current weights;
  the other arms then weigh the current weights' losses) or each EvoGrad copy its own (the
  EvoGrad code's; EvoGrad's mean is then the look-ahead differentiated through the MWN's
  input too).

    python apps/noisy_labels.py                                  # CPU default, 3 seeds
    python apps/noisy_labels.py --noise=flip --arms=uniform,mwn_evograd
    python apps/noisy_labels.py --network=resnet18 --width=64 --weight_decay=5e-4 \
        --arms=uniform,clean_only,mwn_evograd,mwn_one_step          # GPU

The CPU default network is the MLP (784-512-512-10), trained 60 epochs on 5,000 noisy
examples without weight decay: within that budget it memorises the noisy labels (training
loss 0.43-0.47, below the ~1.4 of fitting the clean labels under the noise), which is the
failure Meta-Weight-Net exists to prevent. The small CNN (--network=cnn) does not memorise within a
CPU budget (training loss still ~1.4 after 30 epochs), so uniform training is already robust
there and reweighting has little to fix.

Writes <output_dir>/summary.md (test accuracy mean +- std over seeds, the paired difference of
every arm to --baseline with a 95% t interval, seconds per step, peak memory, and for the MWN
arms the mean weight of clean and of corrupted examples), summary.json (the accuracies; the
rest is in results/<arm>_seed<k>.json) and
noisy_labels.png (the learned weight against the loss; test accuracy per epoch). Every
(arm, seed) checkpoints each epoch under <output_dir>/<arm>_seed<k> and resumes from there;
finished arms are reused (runner.run_grid). A seed fixes a run: bit-identical on CPU.
"""

import dataclasses
import os
import sys
import time

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
from benchmarks import memory  # noqa: E402
from keras_metapt import nets, optim  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.data import label_noise  # noqa: E402

FLAGS = flags.FLAGS
ESTIMATORS = ("one_step", "evograd", "implicit", "hyperdistill", "lookahead5")
ARMS = ("uniform", "clean_only") + tuple(f"mwn_{e}" for e in ESTIMATORS)
# the arms that evaluate the inner loss away from the current weights: --mwn_input applies
MWN_INPUT_ARMS = ("mwn_evograd", "mwn_hyperdistill", "mwn_lookahead5")
NUM_CLASSES = 10
LR_DECAY_AT = (0.6, 0.8)  # fractions of the epochs where the SGD rate is multiplied by 0.1
WEIGHT_CURVE_LOSSES = np.linspace(0.0, 8.0, 81)

flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Folder of MNIST-layout IDX "
                    "files (train-/t10k- images and labels); default Debian's Fashion-MNIST.")
flags.DEFINE_enum("noise", "uniform", list(label_noise.NOISE_KINDS), "Label noise: uniform "
                  "(a label becomes a uniformly drawn class) or flip (class c becomes c + 1).")
flags.DEFINE_float("noise_rate", 0.4, "Probability that a training label is corrupted.")
flags.DEFINE_integer("num_train", 5000, "Noisy training examples (a seeded subset of the "
                     "training split without the meta set; 0: all of it).")
flags.DEFINE_integer("num_meta", 1000, "Clean meta examples, class-balanced, from the training "
                     "split.")
flags.DEFINE_integer("num_test", 0, "Test examples (the first N of the test split; 0: all).")
flags.DEFINE_integer("split_seed", 0, "Seed of the meta set, the training subset and the label "
                     "noise (the same data for every seed and arm).")
flags.DEFINE_enum("network", "mlp", list(nets.IMAGE_CLASSIFIERS),
                  "Classifier body: an MLP (two ReLU layers of 32 x width units), a small CNN "
                  "(3 conv stages of width, 2x, 4x filters, BatchNorm, global average pooling) "
                  "or a ResNet for 28x28 inputs (width, 2x, 4x, 8x channels).")
flags.DEFINE_integer("width", 16, "Network width: the MLP has 32 x width units per layer, the "
                     "CNN and ResNets width filters in their first stage.")
flags.DEFINE_list("arms", ["uniform", "clean_only", "mwn_one_step", "mwn_evograd"],
                  "Arms to run, out of " + ", ".join(ARMS) + " (the hypergradient estimator is "
                  "part of the arm's name).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initialisation, batch order, EvoGrad "
                  "noise); every arm of a seed starts from the same weights.")
flags.DEFINE_enum("baseline", "uniform", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with, paired by seed.")
flags.DEFINE_integer("epochs", 60, "Epochs over the noisy training set; every arm takes "
                     "epochs x ceil(num_train / batch_size) steps.")
flags.DEFINE_integer("batch_size", 100, "Training and meta batch size.")
flags.DEFINE_float("lr", 0.05, "SGD learning rate (momentum 0.9), x0.1 after 60% and 80% of the "
                   "epochs; the one-step look-ahead and the Neumann step follow the current rate.")
flags.DEFINE_float("weight_decay", 0.0, "L2 coefficient added to the SGD gradients.")
flags.DEFINE_float("meta_lr", 1e-3, "Adam learning rate of the Meta-Weight-Net.")
flags.DEFINE_integer("mwn_hidden", 100, "Hidden units of the Meta-Weight-Net (1-H-1).")
flags.DEFINE_integer("evograd_copies", 2, "EvoGrad: K perturbed copies of the weights.")
flags.DEFINE_float("evograd_sigma", 1e-3, "EvoGrad: noise scale of the copies.")
flags.DEFINE_float("evograd_temperature", 0.05, "EvoGrad: softmax temperature tau.")
flags.DEFINE_enum("evograd_noise", "rademacher", ["rademacher", "gaussian"], "EvoGrad: noise "
                  "of the copies, sigma times random signs (the EvoGrad code's "
                  "Meta-Weight-Net experiment) or sigma times standard normals.")
flags.DEFINE_enum("mwn_input", "current", list(km.reweighting.MWN_INPUTS), "Which losses the "
                  "Meta-Weight-Net weighs inside the hypergradient of mwn_evograd, "
                  "mwn_hyperdistill and mwn_lookahead5: 'current' (default), the losses of the "
                  "current weights, the same for every evaluation of the inner loss (EvoGrad's "
                  "mean is then the original one-step hypergradient, benchmarks/"
                  "evograd_agreement.py; one more forward pass per step); 'evaluated', the "
                  "losses at the weights each evaluation uses, so every EvoGrad copy weighs its "
                  "own (the original codes); 'copies_mean', EvoGrad's copies weighed at the mean "
                  "of their K losses per example (as 'current' to first order in sigma, "
                  "without its extra forward pass; mwn_hyperdistill and mwn_lookahead5 then "
                  "weigh the current losses). mwn_one_step and mwn_implicit evaluate the inner "
                  "loss at the current weights only: the flag does not apply to them.")
flags.DEFINE_integer("neumann_terms", 1, "mwn_implicit: Hessian-vector products of the "
                     "Neumann series (n gives the terms (I - lr H)^0 .. ^n).")
flags.DEFINE_bool("xla", False, "Compile the training steps with XLA (runs then need not repeat "
                  "bit for bit; see apps/runner.py).")
flags.DEFINE_string("output_dir", "runs/noisy_labels", "Results, plot and checkpoints.")
flags.DEFINE_bool("resume", True, "Reuse finished (arm, seed) results and resume unfinished ones "
                  "from their last epoch checkpoint, when made with the same settings.")
flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar per epoch; 2: a line per epoch.")
flags.DEFINE_bool("plot", True, "Write noisy_labels.png.")
runner.define_strategy_flags("training: each step, hypergradient included, data-parallel "
                             "(not mwn_hyperdistill)")
runner.define_hyperdistill_flags("mwn_hyperdistill", every_default=500)
flags.adopt_module_key_flags(runner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort)."""

    images_dir: str
    noise: str
    noise_rate: float
    num_train: int
    num_meta: int
    num_test: int
    split_seed: int
    network: str
    width: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    meta_lr: float
    mwn_hidden: int
    evograd_copies: int
    evograd_sigma: float
    evograd_temperature: float
    evograd_noise: str
    mwn_input: str
    neumann_terms: int
    hyperdistill_gamma: float
    hyperdistill_every: int
    hyperdistill_reference_steps: int
    hyperdistill_anchor_every: int
    xla: bool
    verbose: int
    plot: bool

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose", "plot")
    DATA_PATHS = ("images_dir",)
    ARM_SETTINGS = {"mwn_evograd": ("evograd_copies", "evograd_sigma", "evograd_temperature",
                                    "evograd_noise", "mwn_input"),
                    **{arm: ("mwn_input",) for arm in MWN_INPUT_ARMS if arm != "mwn_evograd"}}
    BOUNDS = {"noise_rate": "[0, 1]", "num_train": "[0, inf)", "num_meta": "[10, inf)",
              "num_test": "[0, inf)", "split_seed": "[0, inf)", "width": "[1, inf)",
              "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)",
              "weight_decay": "[0, inf)", "meta_lr": "[0, inf)", "mwn_hidden": "[1, inf)",
              "evograd_copies": "[2, inf)", "evograd_sigma": "(0, inf)",
              "evograd_temperature": "(0, inf)", "neumann_terms": "[1, inf)",
              **runner.HYPERDISTILL_BOUNDS,
              "verbose": "[0, 2]"}

    def results_config_of(self, arm):
        """An arm's settings (`runner.Config.results_config_of`); --mwn_input only when it is
        not "evaluated", so results stored before the flag existed (all "evaluated") are
        still recognised."""
        config = super().results_config_of(arm)
        if "mwn_input" in config:
            config["mwn_input"] = mwn_input_of(arm, config["mwn_input"])
        if config.get("mwn_input") == "evaluated":
            del config["mwn_input"]
        return config

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "default" and "mwn_hyperdistill" in self.arms:
            raise app.UsageError(f"--strategy={self.strategy}: mwn_hyperdistill runs on one "
                                 f"device (its online state is not split over replicas); leave "
                                 f"it out of --arms")


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class NoisyData:
    x_train: np.ndarray
    y_train: np.ndarray      # noisy labels
    corrupted: np.ndarray    # bool: the label differs from the true one
    x_meta: np.ndarray
    y_meta: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(config):
    """The clean meta set, the noisy training subset and the test split (see module doc)."""
    (x, y), (x_test, y_test) = image_data.load_idx_dataset(config.images_dir)
    if config.num_meta >= len(x):
        raise app.UsageError(f"--num_meta={config.num_meta}: the training split has {len(x)}")
    try:
        meta, rest = label_noise.split_clean_meta(y, config.num_meta, NUM_CLASSES,
                                                  config.split_seed)
    except ValueError as error:
        raise app.UsageError(f"--num_meta={config.num_meta}: {error}") from None
    if config.num_train:
        if config.num_train > len(rest):
            raise app.UsageError(f"--num_train={config.num_train}: only {len(rest)} training "
                                 f"examples remain after the meta set")
        rest = rest[:config.num_train]
    noisy, corrupted = label_noise.corrupt_labels(y[rest], config.noise_rate, config.noise,
                                                  NUM_CLASSES, config.split_seed + 1)
    if config.num_test:
        x_test, y_test = x_test[:config.num_test], y_test[:config.num_test]
    return NoisyData(x[rest], noisy.astype(np.int32), corrupted, x[meta], y[meta], x_test, y_test)


# Tags that keep the random streams apart: NumPy seeds [s, 0] and s alike (trailing zeros of a
# seed sequence do not count), so every stream starts with its own non-zero tag.
ORDER_TAG, META_TAG = 101, 102


def batch_order(seed, epoch, num_examples, batch_size, num_steps):
    """``num_steps`` index batches of one epoch, from successive permutations seeded by (seed,
    epoch, j), j = 0, 1, ... (a set smaller than an epoch of steps is passed over several
    times, each in a fresh order)."""
    needed = num_steps * batch_size
    parts = [np.random.default_rng([ORDER_TAG, seed, epoch, j]).permutation(num_examples)
             for j in range(-(-needed // num_examples))]
    return np.concatenate(parts)[:needed].reshape(num_steps, batch_size)


# ----------------------------------------------------------------------------- one arm

def make_estimator(arm, config, reduce=None):
    """The arm's hypergradient estimator (the one-step look-ahead follows the trainer's current
    SGD rate through the problem's ``inner_optimizer_hparams``); ``reduce``: the cross-replica
    sum of a data-parallel run."""
    name = arm[len("mwn_"):]
    if name == "one_step":
        return km.Unrolled(optim.sgd(config.lr), num_steps=1, gradient_reduction=reduce)
    if name == "lookahead5":  # the truncated hypergradient of horizon K = 5
        return km.Unrolled(optim.sgd(config.lr), num_steps=5, gradient_reduction=reduce)
    if name == "hyperdistill":
        return runner.hyperdistill_estimator(config, config.lr, reduce)
    if name == "evograd":
        return km.EvoGrad(num_copies=config.evograd_copies, sigma=config.evograd_sigma,
                          temperature=config.evograd_temperature,
                          noise=config.evograd_noise, gradient_reduction=reduce)
    # alpha: the current SGD rate
    return km.Implicit(km.linalg.neumann(config.neumann_terms), gradient_reduction=reduce)


def make_trainer(arm, seed, config, strategy=None):
    """The arm's `keras_metapt.reweighting.MetaWeightNetTrainer` (weights from the seed set by
    the runner; the MWN from ``seed``), its variables under ``strategy`` (data-parallel with
    several replicas; XLA only on one)."""
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    mwn = meta_optimizer = estimator = None
    with strategy.scope():
        if arm.startswith("mwn_"):
            mwn = km.hyper.MetaWeightNet(config.mwn_hidden, seed=seed)
            meta_optimizer = keras.optimizers.Adam(config.meta_lr, epsilon=1e-12)
            estimator = make_estimator(arm, config,
                                       km.distribute.replica_sum if replicas > 1 else None)
        model = nets.image_classifier(config.network, config.width, NUM_CLASSES)
    return km.reweighting.MetaWeightNetTrainer(
        model, learning_rate=config.lr, weight_decay=config.weight_decay, mwn=mwn,
        meta_optimizer=meta_optimizer, estimator=estimator, seed=seed,
        jit_compile=config.xla and replicas == 1, strategy=strategy,
        mwn_input=mwn_input_of(arm, config.mwn_input))


def mwn_input_of(arm, mwn_input):
    """The trainer's ``mwn_input`` for ``arm`` under --mwn_input: "evaluated" outside
    MWN_INPUT_ARMS (the same computation either way there); "copies_mean" applies to EvoGrad's
    copies only, the other arms weigh the current losses then."""
    if arm not in MWN_INPUT_ARMS:
        return "evaluated"
    return "current" if mwn_input == "copies_mean" and arm != "mwn_evograd" else mwn_input


def learning_rate_at(epoch, config):
    return config.lr * 0.1 ** sum(epoch >= f * config.epochs for f in LR_DECAY_AT)


def run_arm(config, data, arm, seed, strategy=None):
    """Trains one arm for config.epochs, resuming from its last epoch checkpoint."""
    trainer = make_trainer(arm, seed, config, strategy)
    epochs_done = tf.Variable(0, dtype=tf.int64, name="epoch")
    history, save = runner.resume_run(
        runner.run_directory(config, arm, seed),
        dict(epoch=epochs_done, **trainer.checkpoint_items()),
        {"test_accuracy": [], "seconds_per_step": [], "train_loss": [], "meta_loss": []},
        epochs_done.numpy, unit="epoch")
    if arm == "clean_only":
        x_fit, y_fit = data.x_meta, data.y_meta
    else:
        x_fit, y_fit = data.x_train, data.y_train
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (see benchmarks/memory.py)
        resident_before = memory.rss_mib()["VmRSS"]
    while int(epochs_done.numpy()) < config.epochs:
        epoch = int(epochs_done.numpy())
        trainer.optimizer.learning_rate = learning_rate_at(epoch, config)
        order = batch_order(seed, epoch, len(x_fit), config.batch_size, steps_per_epoch)
        meta_rng = np.random.default_rng([META_TAG, seed, epoch])
        progbar = keras.utils.Progbar(steps_per_epoch, verbose=config.verbose == 1,
                                      stateful_metrics=["loss", "meta loss"])
        start, losses, meta_losses = time.perf_counter(), [], []
        for i, rows in enumerate(order):
            meta_rows = meta_rng.choice(len(data.x_meta), config.batch_size,
                                        replace=config.batch_size > len(data.x_meta))
            loss, meta_loss = trainer.train_step(
                (x_fit[rows], y_fit[rows]), (data.x_meta[meta_rows], data.y_meta[meta_rows]))
            losses.append(float(loss))
            meta_losses.append(float(meta_loss))
            progbar.update(i + 1, [("loss", losses[-1])]
                           + [("meta loss", meta_losses[-1])] * (trainer.mwn is not None))
        seconds = time.perf_counter() - start
        history["seconds_per_step"].append(seconds / steps_per_epoch)
        history["train_loss"].append(float(np.mean(losses)))
        history["meta_loss"].append(float(np.mean(meta_losses)))
        history["test_accuracy"].append(trainer.accuracy(data.x_test, data.y_test))
        epochs_done.assign_add(1)
        if config.verbose:
            runner.log(f"  epoch {epoch + 1}/{config.epochs}: train loss "
                       f"{history['train_loss'][-1]:.4f}, test accuracy "
                       f"{history['test_accuracy'][-1]:.4f}, {seconds:.1f} s")
        save(history)
    if gpu:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
    else:
        peak = memory.rss_mib()["VmHWM"] - resident_before
    record = {"test_accuracy_final": history["test_accuracy"][-1],
              "test_accuracy_by_epoch": history["test_accuracy"],
              "train_loss_by_epoch": history["train_loss"],
              # the first epoch holds the tracing: the later ones time the steps
              "seconds_per_step": float(np.median(history["seconds_per_step"][1:]
                                                  or history["seconds_per_step"])),
              "peak_memory_mib": float(peak),
              "peak_memory_kind": "GPU peak allocated" if gpu else (
                  "CPU: peak resident memory of the arm above the resident memory before it "
                  "(TensorFlow pools freed memory, so arms after the first in a process show "
                  "less; benchmarks.evograd_scaling measures each method in a fresh process)")}
    if trainer.mwn is not None:
        weights = trainer.example_weights(data.x_train, data.y_train)
        record.update(
            mean_weight_clean=float(weights[~data.corrupted].mean()),
            mean_weight_corrupted=float(weights[data.corrupted].mean())
            if data.corrupted.any() else None,
            weight_curve=trainer.mwn(tf.constant(WEIGHT_CURVE_LOSSES, tf.float32)
                                     ).numpy().tolist())
    if isinstance(trainer.estimator, km.HyperDistill):
        record.update(hyperdistill_scale=float(trainer.estimator.scale),
                      hyperdistill_references=int(trainer.estimator.state.references.numpy()))
    runner.log(f"  final test accuracy {record['test_accuracy_final']:.4f}")
    return record


# ----------------------------------------------------------------------------- report

def method_table(records):
    """Per arm: seconds per step, peak memory, and the MWN arms' mean weights."""
    lines = ["", "| arm | s / step | peak memory (MiB) | mean weight clean | mean weight "
             "corrupted |", "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if not rows:
            continue

        def mean(key, fmt):
            values = [r[key] for r in rows if r.get(key) is not None]
            return format(float(np.mean(values)), fmt) if values else "-"
        lines.append(f"| {arm} | {mean('seconds_per_step', '.4f')} | "
                     f"{mean('peak_memory_mib', '.0f')} | {mean('mean_weight_clean', '.3f')} | "
                     f"{mean('mean_weight_corrupted', '.3f')} |")
    kind = next(iter(records.values()))["peak_memory_kind"] if records else ""
    return "\n".join(lines) + f"\n\nPeak memory: {kind}.\n"


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if not rows:
            continue
        accuracy = np.mean([r["test_accuracy_by_epoch"] for r in rows], axis=0)
        right.plot(np.arange(1, len(accuracy) + 1), accuracy, label=arm)
        if "weight_curve" in rows[0]:
            left.plot(WEIGHT_CURVE_LOSSES, np.mean([r["weight_curve"] for r in rows], axis=0),
                      label=arm)
    left.set(xlabel="training loss of an example", ylabel="Meta-Weight-Net weight",
             title="learned weighting (mean over seeds)")
    right.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config, strategy = runner.setup(Config)
    data = load_data(config)
    if strategy.num_replicas_in_sync > 1:
        runner.log(f"{strategy.num_replicas_in_sync} replicas ({config.strategy}): every "
                   f"step data-parallel, batches split into {strategy.num_replicas_in_sync} "
                   f"shards")
    runner.log(f"{len(data.x_train)} noisy training examples ({config.noise} noise, "
               f"{data.corrupted.mean():.1%} of the labels wrong), {len(data.x_meta)} clean meta "
               f"examples, {len(data.x_test)} test examples")
    records = runner.run_grid(config, lambda arm, seed, _: run_arm(config, data, arm, seed,
                                                                   strategy))
    table, _ = runner.summarise(records, config, ("final",), metric="test_accuracy",
                                labels={"final": "test accuracy (last epoch)"},
                                rate_column=False, appendix=method_table(records))
    print("\n" + table)
    if config.plot:
        plot(records, os.path.join(config.output_dir, "noisy_labels.png"))


if __name__ == "__main__":
    app.run(main)
