r"""MetaPerturb (Ryu et al. 2020): meta-train one shared perturbation function over several
heterogeneous source tasks, freeze it, and use it as the regulariser of a different
architecture on an unseen dataset; against no regulariser, dropout and fine-tuning.

Data (all offline; the CPU stand-in for the paper's Tiny ImageNet splits -> STL-10 / CIFAR /
aircraft / cars, which cannot be had here):
- source tasks: four Fashion-MNIST classification tasks with different label sets (classes
  0-4, 5-9, even, odd), each with its own --source_train_per_task training and
  --source_val_per_task validation images, disjoint from every other task's;
- target: scikit-learn's bundled handwritten digits (1,797 8x8 images, scaled to [0, 1] and
  resized bilinearly to 28x28): --target_train_per_class training images per class, drawn
  from the seed; every other image is the test set.
Architectures: the source tasks use a conv net (4 blocks of conv 3x3 -> batch norm ->
[perturbation] -> ReLU -> max-pool, --source_width channels); the target uses a
ResNet-10-style network (--target_width, perturbation after each block's residual sum), so the
perturbation is transferred to an architecture it never saw.

Arms, each with the same target split, initial network and batches for a seed:
- base: the ResNet trained on the target with no regulariser;
- dropout: element-wise dropout (--dropout_rate) at the perturbation's sites;
- finetune: the ResNet first trained on the source images (all ten Fashion-MNIST classes,
  --source_steps steps), then its body fine-tuned on the target with a new head;
- metaperturb: the perturbation meta-trained with the four source tasks (--source_steps steps)
  by the first-order hypergradient of the original's code (the validation loss's gradient at
  the updated networks), then frozen in the target ResNet; test predictions average the
  softmax over --test_samples noise draws;
- metaperturb_one_step: the same with the second-order one-step look-ahead hypergradient
  (keras_metapt.Unrolled through one SGD step at --source_lr): the perturbation's effect on the
  validation loss through the networks' training step;
- metaperturb_adam_lookahead: the same look-ahead through the step the networks really take,
  their Adam at its current moments and step count (optim.mirror_keras), not an SGD step.

    python apps/metaperturb_transfer.py                     # CPU default, 5 seeds, 6 arms
    python apps/metaperturb_transfer.py --arms=base,metaperturb --seeds=0,1,2

Writes <output_dir>/summary.md (per arm: test accuracy mean +- std over seeds; paired
differences to --baseline with 95% t intervals; seconds per step of each stage),
summary.json, and metaperturb_transfer.png (the learned perturbation's mean channel scale on
fixed probe maps over source training; test accuracy per arm). Every (arm, seed) checkpoints its
stages every --checkpoint_every steps under <output_dir>/<arm>_seed<k> and resumes there;
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
from keras_metapt import optim, perturb_transfer  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.hyper.metaperturb import channel_scale  # noqa: E402

FLAGS = flags.FLAGS
ARMS = ("base", "dropout", "finetune", "metaperturb", "metaperturb_one_step",
        "metaperturb_adam_lookahead")
# the look-ahead of each MetaPerturb arm's hypergradient (the others: first order)
LOOK_AHEADS = {"metaperturb_one_step": "sgd", "metaperturb_adam_lookahead": "adam"}
SOURCE_TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
DATA_TAG, BATCH_TAG = 109, 110
SOURCE_STREAM, VALIDATION_STREAM, TARGET_STREAM, PRETRAIN_STREAM = 0, 1, 2, 3

flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Folder of MNIST-layout IDX "
                    "files of Fashion-MNIST (the source tasks); default Debian's package.")
flags.DEFINE_list("arms", list(ARMS), "Arms to run, out of " + ", ".join(ARMS) + ".")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (target split, initial networks, "
                  "batches, noise); every arm of a seed sees the same.")
flags.DEFINE_enum("baseline", "base", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with, paired by seed.")
flags.DEFINE_integer("source_steps", 400, "Steps of the source stage (meta-training of the "
                     "perturbation; pre-training for finetune).")
flags.DEFINE_integer("source_train_per_task", 1000, "Training images of each source task.")
flags.DEFINE_integer("source_val_per_task", 500, "Validation images of each source task (the "
                     "perturbation's outer loss).")
flags.DEFINE_integer("source_width", 16, "Channels of every block of the source conv net.")
flags.DEFINE_integer("source_batch", 32, "Batch size of every source task (training and "
                     "validation) and of finetune's pre-training.")
flags.DEFINE_float("source_lr", 1e-3, "Adam learning rate of the source networks (and of "
                   "finetune's pre-training).")
flags.DEFINE_float("perturb_lr", 1e-2, "Adam learning rate of the perturbation's weights. "
                   "The original's 1e-3 over its 750 steps, raised for the CPU default's 400 "
                   "steps: phi starts at N(0, 0.01^2), and the channel scale sigmoid(f . v) "
                   "needs |v| of order 1 to leave 0.5.")
flags.DEFINE_integer("target_train_per_class", 20, "Training images per digit class.")
flags.DEFINE_integer("target_steps", 300, "Adam steps on the target (75 epochs of the "
                     "default 200 training images).")
flags.DEFINE_integer("target_width", 8, "Base width of the target ResNet (8, 16, 32, 64 "
                     "channels).")
flags.DEFINE_integer("target_batch", 50, "Target batch size.")
flags.DEFINE_float("target_lr", 1e-3, "Adam learning rate on the target.")
flags.DEFINE_float("dropout_rate", 0.1, "Dropout arm: the rate at every site.")
flags.DEFINE_float("anneal_fraction", 0.4, "Metaperturb arm: the noise coefficient grows "
                   "linearly from 0 to 1 over this fraction of --target_steps (the original's "
                   "0.4).")
flags.DEFINE_float("clip_value", 100.0, "Upper clip of the perturbed features (the "
                   "original's 100).")
flags.DEFINE_integer("test_samples", 10, "Metaperturb arm: noise draws averaged per test "
                     "prediction.")
flags.DEFINE_integer("eval_batch", 500, "Images per evaluation batch (batch normalisation "
                     "uses each batch's statistics).")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints (and log lines).")
flags.DEFINE_bool("xla", False, "Compile the steps with XLA (runs then need not repeat bit for "
                  "bit; see apps/runner.py).")
runner.define_run_flags("metaperturb_transfer")
runner.define_strategy_flags("training (only the default, one device, is supported here)")
flags.adopt_module_key_flags(runner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort)."""

    images_dir: str
    source_steps: int
    source_train_per_task: int
    source_val_per_task: int
    source_width: int
    source_batch: int
    source_lr: float
    perturb_lr: float
    target_train_per_class: int
    target_steps: int
    target_width: int
    target_batch: int
    target_lr: float
    dropout_rate: float
    anneal_fraction: float
    clip_value: float
    test_samples: int
    eval_batch: int
    checkpoint_every: int
    xla: bool
    verbose: int
    plot: bool

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose", "plot", "checkpoint_every")
    DATA_PATHS = ("images_dir",)
    BOUNDS = {"source_steps": "[1, inf)", "source_train_per_task": "[2, inf)",
              "source_val_per_task": "[2, inf)", "source_width": "[1, inf)",
              "source_batch": "[2, inf)", "source_lr": "(0, inf)", "perturb_lr": "[0, inf)",
              "target_train_per_class": "[1, inf)", "target_steps": "[1, inf)",
              "target_width": "[1, inf)", "target_batch": "[2, inf)", "target_lr": "(0, inf)",
              "dropout_rate": "[0, 1)", "anneal_fraction": "[0, 1]",
              "clip_value": "(0, inf)", "test_samples": "[1, inf)", "eval_batch": "[2, inf)",
              "checkpoint_every": "[1, inf)", "verbose": "[0, 2]"}

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "default":
            raise app.UsageError(f"--strategy={self.strategy}: this app runs on one device")
        for limit in ("source_train_per_task", "source_val_per_task"):
            if self.source_batch > getattr(self, limit):
                raise app.UsageError(f"--source_batch={self.source_batch} exceeds "
                                     f"--{limit}={getattr(self, limit)}")
        if self.target_batch > 10 * self.target_train_per_class:
            raise app.UsageError(f"--target_batch={self.target_batch} exceeds the "
                                 f"{10 * self.target_train_per_class} target training images "
                                 "(10 x --target_train_per_class)")


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data:
    source_train: list      # per task: (images, labels 0..k-1)
    source_val: list
    pretrain: tuple         # every source training image with its Fashion-MNIST label
    target_train: tuple
    target_test: tuple
    source_indices: list    # per task: the Fashion-MNIST training indices it uses


def load_data(config, seed):
    """The source tasks' images (the same for every seed) and the seed's target split."""
    (x, y), _ = image_data.load_idx_dataset(config.images_dir)
    order = np.random.default_rng([DATA_TAG, 0]).permutation(len(x))
    used = np.zeros(len(x), bool)
    train, val = [], []
    per_task = config.source_train_per_task + config.source_val_per_task
    for classes in SOURCE_TASKS:
        chosen = order[np.isin(y[order], classes) & ~used[order]][:per_task]
        if len(chosen) < per_task:
            raise app.UsageError(f"{config.images_dir}: the source task of classes {classes} "
                                 f"needs {per_task} images, {len(chosen)} are left")
        used[chosen] = True
        labels = np.searchsorted(np.array(classes), y[chosen]).astype(np.int32)
        cut = config.source_train_per_task
        train.append((x[chosen[:cut]], labels[:cut], chosen[:cut]))
        val.append((x[chosen[cut:]], labels[cut:], chosen[cut:]))
    pretrain_index = np.concatenate([t[2] for t in train])
    digits, digit_labels = image_data.load_digits_28x28()
    rng = np.random.default_rng([DATA_TAG, 1, seed])
    picked = np.concatenate([rng.permutation(np.flatnonzero(digit_labels == c))
                             [:config.target_train_per_class] for c in range(10)])
    if len(picked) < 10 * config.target_train_per_class:
        raise app.UsageError(f"--target_train_per_class={config.target_train_per_class}: "
                             "a digit class has fewer images")
    rest = np.setdiff1d(np.arange(len(digits)), picked)
    return Data([t[:2] for t in train], [v[:2] for v in val],
                (x[pretrain_index], y[pretrain_index]),
                (digits[picked], digit_labels[picked]), (digits[rest], digit_labels[rest]),
                [t[2] for t in train] + [v[2] for v in val])


def batch(data, size, seed, step, stream, task=0):
    """A batch of ``size`` distinct examples of (images, labels), drawn from (seed, step)."""
    images, labels = data
    index = np.random.default_rng([BATCH_TAG, seed, stream, task, step]).choice(
        len(images), size, replace=False)
    return tf.constant(images[index]), tf.constant(labels[index])


# ----------------------------------------------------------------------------- stages

def train_stage(trainer, directory, total, config, step_fn, history_keys, describe):
    """Runs ``step_fn(step) -> (losses...)`` until ``trainer.step`` reaches ``total``,
    checkpointing under ``directory``; returns the history (one row per checkpoint)."""
    os.makedirs(directory, exist_ok=True)
    history, save = runner.resume_run(
        directory, trainer.checkpoint_items(),
        {"step": [], "seconds_per_step": [], **{k: [] for k in history_keys}},
        trainer.step.numpy, key="step")
    progbar = keras.utils.Progbar(total, verbose=config.verbose == 1)
    while int(trainer.step.numpy()) < total:
        first = int(trainer.step.numpy())
        last = min(first + config.checkpoint_every, total)
        start, rows = time.perf_counter(), []
        for step in range(first, last):
            rows.append(step_fn(step))
            progbar.update(step + 1, [("loss", rows[-1][0])])
        history["step"].append(last)
        history["seconds_per_step"].append((time.perf_counter() - start) / (last - first))
        for key, values in describe(rows).items():
            history[key].append(values)
        if config.verbose == 2:
            runner.log(f"  {os.path.basename(directory)} step {last}/{total}: loss "
                       f"{np.mean([r[0] for r in rows]):.4f}")
        save(history)
    return history


def perturbation_summary(perturb):
    """Mean channel scale s and mean multiplier s * E[z] of ``perturb`` on a fixed probe:
    standard normal maps of 16 channels at 28x28 and 8 at 7x7 (what the plot follows)."""
    phi = perturb.hparams()
    out = {}
    for name, shape in (("probe_28x28", (16, 28, 28, 16)), ("probe_7x7", (16, 7, 7, 8))):
        x = tf.random.stateless_normal(shape, [7, 7])
        scale = channel_scale(x, phi[4], phi[5], perturb.channel_norm,
                                                   perturb.spatial_norm)
        y = perturb.apply(phi, x, tf.constant([8, 8], tf.int64))
        out[f"{name}_scale"] = float(tf.reduce_mean(scale))
        out[f"{name}_gain"] = float(tf.reduce_sum(y * x) / tf.reduce_sum(x * x))
    return out


def meta_train_perturbation(config, data, seed, directory, look_ahead=None):
    """look_ahead: None (first order), "sgd" (one SGD step at --source_lr) or "adam" (the
    networks' Adam step from its current state)."""
    classifiers = [perturb_transfer.ConvClassifier(len(classes), config.source_width,
                                                   seed=1000 * seed + t)
                   for t, classes in enumerate(SOURCE_TASKS)]
    perturb = km.hyper.MetaPerturb(seed=seed)
    estimator = (km.Unrolled(optim.sgd(config.source_lr), num_steps=1)
                 if look_ahead == "sgd" else None)
    from_optimizer = ((lambda twin: km.Unrolled(twin, num_steps=1)) if look_ahead == "adam"
                      else None)
    trainer = perturb_transfer.SourceMetaTrainer(
        classifiers, perturb, learning_rate=config.source_lr,
        perturb_learning_rate=config.perturb_lr, estimator=estimator,
        estimator_from_optimizer=from_optimizer,
        clip_value=config.clip_value, seed=seed, jit_compile=config.xla)

    def step_fn(step):
        train = tuple(batch(d, config.source_batch, seed, step, SOURCE_STREAM, t)
                      for t, d in enumerate(data.source_train))
        val = tuple(batch(d, config.source_batch, seed, step, VALIDATION_STREAM, t)
                    for t, d in enumerate(data.source_val))
        return tuple(float(v) for v in trainer.train_step(train, val))

    def describe(rows):
        return {"train_loss": float(np.mean([r[0] for r in rows])),
                "val_loss": float(np.mean([r[1] for r in rows])),
                "perturbation": perturbation_summary(perturb)}

    history = train_stage(trainer, directory, config.source_steps, config, step_fn,
                          ("train_loss", "val_loss", "perturbation"), describe)
    return perturb, history


def train_target(config, data, seed, directory, regulariser, perturb=None, body=None):
    classifier = perturb_transfer.ResNetClassifier(10, config.target_width, seed=seed)
    if body is not None:  # a resumed run's checkpoint overwrites it
        classifier.copy_body_from(body)
    trainer = perturb_transfer.TargetTrainer(
        classifier, regulariser=regulariser, learning_rate=config.target_lr, perturb=perturb,
        dropout_rate=config.dropout_rate,
        anneal_steps=round(config.anneal_fraction * config.target_steps),
        clip_value=config.clip_value, seed=seed, jit_compile=config.xla)

    def step_fn(step):
        return (float(trainer.train_step(*batch(data.target_train, config.target_batch, seed,
                                                step, TARGET_STREAM))),)

    history = train_stage(trainer, directory, config.target_steps, config, step_fn,
                          ("train_loss",),
                          lambda rows: {"train_loss": float(np.mean([r[0] for r in rows]))})
    return trainer, history


def pretrain_body(config, data, seed, directory):
    """finetune's source stage: the target ResNet trained on the source images (10 classes)."""
    classifier = perturb_transfer.ResNetClassifier(10, config.target_width, seed=seed)
    trainer = perturb_transfer.TargetTrainer(classifier, learning_rate=config.source_lr,
                                             seed=seed, jit_compile=config.xla)

    def step_fn(step):
        return (float(trainer.train_step(*batch(data.pretrain, config.source_batch, seed, step,
                                                PRETRAIN_STREAM))),)

    history = train_stage(trainer, directory, config.source_steps, config, step_fn,
                          ("train_loss",),
                          lambda rows: {"train_loss": float(np.mean([r[0] for r in rows]))})
    return classifier, history


def _median_seconds(history):
    # the first chunk holds the tracing: the later ones time the steps
    values = history["seconds_per_step"]
    return float(np.median(values[1:] or values))


def run_arm(config, data, arm, seed):
    directory = runner.run_directory(config, arm, seed)
    record, perturb, body, regulariser = {}, None, None, "none"
    if arm.startswith("metaperturb"):
        perturb, history = meta_train_perturbation(config, data, seed,
                                                   os.path.join(directory, "source"),
                                                   look_ahead=LOOK_AHEADS.get(arm))
        record.update(source_history=history, source_seconds_per_step=_median_seconds(history),
                      perturbation=history["perturbation"][-1],
                      perturb_weights=[v.numpy().tolist() for v in perturb.weight_variables()])
        regulariser = "metaperturb"
    elif arm == "finetune":
        body, history = pretrain_body(config, data, seed, os.path.join(directory, "source"))
        record.update(source_history=history, source_seconds_per_step=_median_seconds(history))
    elif arm == "dropout":
        regulariser = "dropout"
    trainer, history = train_target(config, data, seed, os.path.join(directory, "target"),
                                    regulariser, perturb, body)
    images, labels = data.target_test
    record.update(target_history=history, target_seconds_per_step=_median_seconds(history),
                  test_accuracy_digits=trainer.accuracy(images, labels, config.test_samples,
                                                        config.eval_batch, seed),
                  train_accuracy_digits=trainer.accuracy(*data.target_train,
                                                         config.test_samples,
                                                         config.eval_batch, seed))
    runner.log(f"  digits test accuracy {record['test_accuracy_digits']:.4f} (train "
               f"{record['train_accuracy_digits']:.4f})")
    return record


# ----------------------------------------------------------------------------- report

def cost_table(records):
    lines = ["", "| arm | source s / step | target s / step | train accuracy (mean) |",
             "|---|---:|---:|---:|"]
    for arm in ARMS:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if rows:
            source = [r["source_seconds_per_step"] for r in rows if "source_seconds_per_step" in r]
            lines.append(f"| {arm} | {np.mean(source):.4f} | " if source else f"| {arm} | - | ")
            lines[-1] += (f"{np.mean([r['target_seconds_per_step'] for r in rows]):.4f} | "
                          f"{np.mean([r['train_accuracy_digits'] for r in rows]):.4f} |")
    return "\n".join(lines) + "\n"


def records_seed(records):
    return min(seed for _, seed in records)


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, color in (("metaperturb", "C0"), ("metaperturb_one_step", "C1"),
                       ("metaperturb_adam_lookahead", "C2")):
        for r in [r for (a, _), r in sorted(records.items()) if a == arm]:
            steps = r["source_history"]["step"]
            for key, style in (("probe_28x28_scale", "-"), ("probe_7x7_scale", "--")):
                left.plot(steps, [p[key] for p in r["source_history"]["perturbation"]],
                          style, color=color, alpha=0.7,
                          label=f"{arm} {key[:-6]}" if r["seed"] == records_seed(records)
                          else None)
    arms = [a for a in ARMS if any(arm == a for arm, _ in records)]
    values = [[r["test_accuracy_digits"] for (a, _), r in records.items() if a == arm]
              for arm in arms]
    right.bar(range(len(arms)), [np.mean(v) for v in values],
              yerr=[np.std(v) for v in values], capsize=3)
    right.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    low = min(min(v) for v in values)
    right.set_ylim(max(0.0, low - 0.05), 1.0)
    left.set(xlabel="source step", ylabel="mean channel scale s",
             title="learned perturbation on probe maps (one line per seed)")
    right.set(ylabel="digits test accuracy", title="target (ResNet), mean +- std over seeds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config, _ = runner.setup(Config)
    records = runner.run_grid(config, lambda arm, seed, data: run_arm(config, data, arm, seed),
                              prepare=lambda seed: load_data(config, seed))
    table, _ = runner.summarise(
        records, config, ("digits",), metric="test_accuracy", rate_column=False,
        labels={"digits": "digits test accuracy (ResNet, unseen dataset)"},
        appendix=cost_table(records))
    print("\n" + table)
    if config.plot:
        plot(records, os.path.join(config.output_dir, "metaperturb_transfer.png"))


if __name__ == "__main__":
    app.run(main)
