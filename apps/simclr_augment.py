r"""Experiment 2: SimCLR pre-training with a meta-learned augmentation (ECG or images).

For each seed, ways to obtain an encoder (--arms):
  (a) no_pt:     random initialisation;
  (b) simclr:    SimCLR pre-training with the fixed default augmentations (per-channel cutout
                 and Gaussian noise for signals; per-example crop and flip for images);
  fixed_<s>:     the same SimCLR, each view also passed through the warp (a time warp for
                 signals, a spatial warp for images) at the fixed strength s (0.02, 0.05, 0.1,
                 0.2; every example the same): the sweep that shows which strength is best;
  (c) meta:      the same SimCLR with the warp meta-learned by MetaPretrainer (Raghu et al.
                 2021) for the downstream task: a global strength softplus(rho) (starting at
                 --warp_strength, Adam at --strength_lr) and a per-example magnitude network
                 (batch mean 1, Adam at the slow --magnitude_lr), two optimizer groups;
  meta_online:   as meta, with the PT stage of every hyperstep replaced by HyperDistill's
                 online term over the PT run so far (MetaPretrainer(online=...): the PT steps
                 modelled as SGD at --pt_lr, damped by --hyperdistill_gamma; the --hyperdistill_*
                 flags), in place of the --solver over the PT Hessian: a hypergradient that sees
                 how the warp shaped the encoder over many PT steps, not one;
then linear evaluation (frozen encoder) and full fine-tuning on the labelled examples
(MetaTrain + MetaVal), reporting test AUROC (macro over classes; mean +- std over seeds).
Every arm also records the MetaVal probe: a linear head fitted on MetaTrain (frozen encoder),
its loss and AUROC on MetaVal, the held-out quantity the meta arms' hypergradient aims at
(``meta_val_probe_loss``, ``meta_val_probe_auroc``; no test example is read). The meta arm
records where its strength ends (``warp_strength``), its trajectory over epochs
and, with --curvature_iterations, lambda_max of the PT Hessian (Neumann needs
alpha * lambda_max < 2).

Data (nothing is downloaded):
  --modality=ecg:   PTB-XL from --ptbxl_dir (the official layout; prepared once as a TFDS
                    dataset under --tfds_data_dir). PT on folds 1-9 (labels unused), labelled FT
                    data = the first --num_labelled examples of a seeded permutation of folds
                    1-9, test = fold 10. Encoder: ResNet1D-18. Labels: 5 diagnostic superclasses.
  --modality=image: Fashion-MNIST IDX files from --images_dir (Debian: apt install
                    dataset-fashion-mnist), or --image_folder (one sub-folder per class).
                    --label_fraction of the training images are labelled. Encoder: small CNN.

    python apps/simclr_augment.py --modality=image                 # CPU-sized default
    python apps/simclr_augment.py --modality=ecg --ptbxl_dir=/data/ptb-xl --num_pt=0

Writes <output_dir>/summary.md and summary.json (AUROC table, per-seed AUROCs, each arm's mean
paired difference to --baseline with a 95% t interval), per-run results under results/ (a
rerun skips finished runs made with the same settings; the meta arm also resumes from its
checkpoint), warp_<modality>_seed<k>.png (inputs before and after the learned warp), and
exports the meta arm's encoder and fine-tuned model of the last seed as SavedModels under
<saved_models_dir>/<run_name>_{encoder,finetuned}/<version>/, with the learned augmentation's
weights in <run_name>_meta_parameters.json/.npz. The arms x seeds loop, resume, seeding and
summary are apps/runner.py's; a seed fixes a run.
"""

import dataclasses
import json
import os
import sys
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
from keras_metapt import export  # noqa: E402
from keras_metapt.callbacks import EpochTimer, MetaCheckpoint  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.hyper import (LearnedSpatialWarp, LearnedTimeWarp, RandomCropFlip,  # noqa: E402
                                SignalCutoutNoise, TwoViews)
from keras_metapt.losses import masked_multitask_bce  # noqa: E402
from keras_metapt.nets import linear_head, projection_head, resnet1d18, small_cnn2d  # noqa: E402

FLAGS = flags.FLAGS
FIXED_STRENGTHS = ("0.02", "0.05", "0.1", "0.2")
ARMS = ("no_pt", "simclr") + tuple(f"fixed_{s}" for s in FIXED_STRENGTHS) + ("meta",
                                                                              "meta_online")
flags.DEFINE_enum("modality", "image", ["ecg", "image"], "ecg: PTB-XL and ResNet1D-18; image: "
                  "Fashion-MNIST (or an image folder) and a small CNN.")
flags.DEFINE_string("ptbxl_dir", None, "ECG: PTB-XL folder (ptbxl_database.csv, "
                    "scp_statements.csv, records100/).")
flags.DEFINE_string("tfds_data_dir", None, "ECG: where the PTB-XL TFDS dataset is prepared "
                    "(default <output_dir>/tfds).")
flags.DEFINE_enum("ptbxl_config", "100hz", ["100hz", "500hz"], "ECG: records100 or records500.")
flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Image: folder of MNIST-layout "
                    "IDX files (train-images-idx3-ubyte[.gz], ...).")
flags.DEFINE_string("image_folder", None, "Image: instead of IDX files, a folder with one "
                    "sub-folder of images per class (20% of each class held out as test).")
flags.DEFINE_integer("num_pt", 6000, "PT examples (a seeded subset of the training part; "
                     "0: all).")
flags.DEFINE_integer("num_labelled", 500, "ECG: labelled FT examples (first N of a seeded "
                     "permutation of folds 1-9).")
flags.DEFINE_float("label_fraction", 0.01, "Image: fraction of the training images labelled.")
flags.DEFINE_float("meta_val_fraction", 0.5, "Fraction of the labelled examples used as "
                   "MetaVal (the rest is MetaTrain); the final FT uses both.")
flags.DEFINE_integer("num_test", 2000, "Test examples (0: all).")
flags.DEFINE_integer("split_seed", 0, "Seed of the PT subset and of the labelled subset (fixed "
                     "across --seeds).")
flags.DEFINE_list("arms", ["no_pt", "simclr", "meta"], "Arms to run, out of " + ", ".join(ARMS)
                  + " (fixed_<s>: the warp at the fixed strength s, no meta-learning).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initialisation, augmentation noise, order); "
                  "a seed fixes a run (bit-identical on CPU).")
flags.DEFINE_enum("baseline", "simclr", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with (mean paired per-seed difference, 95% t interval).")
flags.DEFINE_integer("batch_size", 128, "PT batch size (each example gives 2 views).")
flags.DEFINE_integer("ft_batch_size", 32, "MetaTrain / MetaVal / fine-tuning batch size.")
flags.DEFINE_integer("pt_epochs", 5, "PT epochs (the meta arm's first epoch is its warm-up).")
flags.DEFINE_float("pt_lr", 1e-3, "PT Adam learning rate (also the Neumann alpha without "
                   "--neumann_alpha).")
flags.DEFINE_float("temperature", 0.5, "NT-Xent temperature.")
flags.DEFINE_float("strength_lr", 0.1, "Meta arm: Adam learning rate of rho, the global "
                   "strength's parameter (strength = softplus(rho); at small strengths a step "
                   "changes it by a factor of about exp(rate)).")
flags.DEFINE_float("magnitude_lr", 1e-4, "Meta arm: Adam learning rate of the per-example "
                   "magnitude network (slow, as in the official code).")
flags.DEFINE_bool("per_example", True, "Meta arm: learn per-example magnitudes (batch mean 1) "
                  "besides the global strength; --noper_example learns the strength only.")
flags.DEFINE_integer("hyperstep_every", 5, "N: PT steps between hypersteps.")
flags.DEFINE_bool("ft_head_updates_statistics", False, "Meta arms: whether the FT-head steps "
                  "on MetaTrain batches also update the encoder's BatchNorm moving statistics "
                  "(as PyTorch's train mode does in the official code). Off by default: they "
                  "come from the PT batches alone, as in the SimCLR arms (with them on, the "
                  "MetaVal probe loss was higher on each of 5 seeds).")
flags.DEFINE_integer("unroll_steps", 1, "K: differentiable FT-head steps per hyperstep.")
flags.DEFINE_enum("solver", "neumann", ["neumann", "cg"], "Inverse-Hessian solver of the "
                  "hyperstep: a Neumann series or conjugate gradients (stops at curvature <= 0).")
flags.DEFINE_integer("solver_iterations", 1, "i: Neumann terms, or the most CG iterations "
                     "(each one HVP of the PT loss).")
flags.DEFINE_float("neumann_alpha", 0.0, "Neumann step alpha (needs alpha * lambda_max < 2); "
                   "0: the PT optimizer's learning rate at each hyperstep.")
flags.DEFINE_integer("curvature_iterations", 0, "If > 0, estimate lambda_max of the PT Hessian "
                     "at every hyperstep by this many power iterations (that many + 1 HVPs) "
                     "and record it, to check alpha * lambda_max < 2.")
flags.DEFINE_float("warp_strength", 0.05, "Meta arm: initial global strength of the warp (the "
                   "velocity's standard deviation, a fraction of the signal length / image "
                   "size).")
flags.DEFINE_integer("ft_epochs", 30, "Epochs of linear evaluation and of full fine-tuning.")
flags.DEFINE_float("ft_lr", 1e-3, "Fine-tuning Adam learning rate.")
flags.DEFINE_bool("xla", False, "Compile PT steps with XLA (jit_compile). Keras compiles "
                  "without XLA while TensorFlow op determinism is on, so --xla turns op "
                  "determinism off: faster, but a seed no longer pins the run bit for bit.")
# defaults chosen before any run, by the rule of apps/multitask_pt.py: damping gamma 0.99 (a
# horizon of ~100 PT steps; benchmarks.simclr_augment's whole run is 92), the line's start moved
# about every PT epoch of that preset (23 steps; 25), a 20-step reference at each move
runner.define_hyperdistill_flags("meta_online", every_default=25, gamma_default=0.99,
                                 reference_steps_default=20, anchor_every_default=25)
runner.define_strategy_flags("pre-training (each replica contrasts its own shard)")
runner.define_dtype_policy_flag()
flags.adopt_module_key_flags(runner)
flags.DEFINE_string("output_dir", "runs/simclr_augment", "Results, plots and checkpoints.")
flags.DEFINE_string("saved_models_dir", "saved_models", "Where SavedModels are exported.")
flags.DEFINE_string("run_name", None, "Name prefix of the exports (default simclr_<modality>).")
flags.DEFINE_bool("resume", True, "Skip runs whose results exist in --output_dir and were made "
                  "with the same settings (others run again).")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0 silent, 1 progress bar, 2 per epoch).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort); run_name defaults to simclr_<modality>."""

    modality: str
    ptbxl_dir: Optional[str]
    tfds_data_dir: Optional[str]
    ptbxl_config: str
    images_dir: str
    image_folder: Optional[str]
    num_pt: int
    num_labelled: int
    label_fraction: float
    meta_val_fraction: float
    num_test: int
    split_seed: int
    batch_size: int
    ft_batch_size: int
    pt_epochs: int
    pt_lr: float
    temperature: float
    strength_lr: float
    magnitude_lr: float
    per_example: bool
    hyperstep_every: int
    ft_head_updates_statistics: bool
    unroll_steps: int
    solver: str
    solver_iterations: int
    neumann_alpha: float
    curvature_iterations: int
    warp_strength: float
    hyperdistill_gamma: float
    hyperdistill_every: int
    hyperdistill_reference_steps: int
    hyperdistill_anchor_every: int
    ft_epochs: int
    ft_lr: float
    xla: bool
    dtype_policy: str
    saved_models_dir: str
    run_name: Optional[str]
    verbose: int

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + (
        "saved_models_dir", "run_name", "verbose", "tfds_data_dir")
    DATA_PATHS = ("ptbxl_dir", "images_dir", "image_folder")
    BOUNDS = {"num_pt": "[0, inf)", "num_labelled": "[2, inf)", "label_fraction": "(0, 1]",
              "meta_val_fraction": "(0, 1)", "num_test": "[0, inf)", "split_seed": "[0, inf)",
              "batch_size": "[2, inf)", "ft_batch_size": "[1, inf)", "pt_epochs": "[1, inf)",
              "pt_lr": "(0, inf)", "temperature": "(0, inf)", "strength_lr": "[0, inf)",
              "magnitude_lr": "[0, inf)", "hyperstep_every": "[1, inf)",
              "unroll_steps": "[1, inf)", "solver_iterations": "[0, inf)",
              "neumann_alpha": "[0, inf)", "curvature_iterations": "[0, inf)",
              "warp_strength": "(0, inf)", "ft_epochs": "[1, inf)",
              "ft_lr": "(0, inf)", "verbose": "[0, 2]", **runner.HYPERDISTILL_BOUNDS}
    # the online arm reads the HyperDistill settings; the implicit meta arm reads the solver's
    ARM_SETTINGS = {"meta_online": tuple(runner.HYPERDISTILL_BOUNDS)
                    + ("ft_head_updates_statistics",),
                    "meta": ("solver", "solver_iterations", "neumann_alpha",
                             "ft_head_updates_statistics")}

    def __post_init__(self):
        super().__post_init__()
        if self.solver == "cg" and self.solver_iterations < 1:
            raise app.UsageError("--solver=cg needs --solver_iterations >= 1 (0 CG iterations "
                                 "give a zero hypergradient)")
        runner.check_online_arm(self, "meta_online")

    @classmethod
    def from_flags(cls, flag_values=FLAGS):
        config = super().from_flags(flag_values)
        return dataclasses.replace(config, run_name=config.run_name or f"simclr_{config.modality}")


# ----------------------------------------------------------------------------- data

def load_data(config):
    """dict: pt (x), labelled (x, y), test (x, y), num_classes, multilabel, class names."""
    rng = np.random.default_rng(config.split_seed)
    if config.modality == "ecg":
        if not config.ptbxl_dir:
            raise app.UsageError("--modality=ecg needs --ptbxl_dir (the PTB-XL folder)")
        from keras_metapt.data.ptbxl import SUPERCLASSES, build_ptbxl, ptbxl_arrays
        builder = build_ptbxl(config.ptbxl_dir,
                              config.tfds_data_dir or os.path.join(config.output_dir, "tfds"),
                              config.ptbxl_config)
        x, y, _ = ptbxl_arrays(builder, "train")
        x_test, y_test, _ = ptbxl_arrays(builder, "test")
        order = rng.permutation(len(x))
        labelled = order[:config.num_labelled]
        classes, multilabel = SUPERCLASSES, True
    else:
        if config.image_folder:
            x_all, y_all, classes = image_data.load_image_folder(config.image_folder)
            order = rng.permutation(len(x_all))
            cut = int(0.8 * len(order))
            x, y = x_all[order[:cut]], y_all[order[:cut]]
            x_test, y_test = x_all[order[cut:]], y_all[order[cut:]]
        else:
            (x, y), (x_test, y_test) = image_data.load_idx_dataset(config.images_dir)
            classes = image_data.FASHION_MNIST_CLASSES
        labelled = image_data.labelled_subset(len(x), fraction=config.label_fraction,
                                              seed=config.split_seed)
        multilabel = False
    pt_pool = rng.permutation(len(x))
    if config.num_pt:
        pt_pool = pt_pool[:config.num_pt]
    if config.num_test:
        x_test, y_test = x_test[:config.num_test], y_test[:config.num_test]
    if len(labelled) < 2 * config.ft_batch_size:
        raise app.UsageError(f"{len(labelled)} labelled examples; need at least "
                             f"2 x --ft_batch_size={config.ft_batch_size}")
    if len(pt_pool) < config.batch_size:
        raise app.UsageError(f"{len(pt_pool)} PT examples < --batch_size={config.batch_size}")
    return {"pt": x[pt_pool], "labelled": (x[labelled], y[labelled]), "test": (x_test, y_test),
            "classes": tuple(classes), "multilabel": multilabel}


# ----------------------------------------------------------------------------- models

def make_encoder(config, shape):
    """ResNet1D-18 or the small CNN; its initialisation comes from the seed the runner set."""
    if config.modality == "ecg":
        return resnet1d18(shape)
    return small_cnn2d(shape)


def make_views(config, shape, seed, strength=None, learned=False):
    """TwoViews: the fixed augmentation, then (if ``strength``) the warp starting at that
    strength; meta-learned if ``learned`` (per-example magnitudes with --per_example), else
    frozen with every magnitude 1."""
    fixed = SignalCutoutNoise(seed=seed) if config.modality == "ecg" else RandomCropFlip(seed=seed)
    warp = None
    if strength:
        warp_class = LearnedTimeWarp if config.modality == "ecg" else LearnedSpatialWarp
        warp = warp_class(initial_strength=strength, per_example=learned and config.per_example,
                          seed=seed + 1)
        warp.trainable = learned
    views = TwoViews(fixed, warp)
    views.build((None,) + tuple(shape))
    return views


def arm_strength(arm):
    """The fixed warp strength of a fixed_<s> arm (None for other arms)."""
    return float(arm[len("fixed_"):]) if arm.startswith("fixed_") else None


def ft_loss_fn(multilabel):
    if multilabel:
        return lambda y, logits: masked_multitask_bce(y, logits)
    return lambda y, logits: tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def batched(arrays, batch_size, seed=None):
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if seed is not None:
        ds = ds.shuffle(len(arrays[0]) if isinstance(arrays, tuple) else len(arrays), seed=seed,
                        reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=True)


def pretrain_simclr(config, encoder, data, seed, strategy, strength=None):
    """Plain SimCLR; with ``strength``, each view also goes through the frozen warp."""
    with strategy.scope():
        model = km.simclr.SimCLR(encoder, projection_head(encoder.output_shape[-1]),
                                 make_views(config, data["pt"].shape[1:], seed, strength),
                                 config.temperature)
        model.compile(keras.optimizers.Adam(config.pt_lr), jit_compile=config.xla)
    steps = len(data["pt"]) // config.batch_size
    timer = EpochTimer()
    model.fit(batched(data["pt"], config.batch_size, seed).repeat(), epochs=config.pt_epochs,
              steps_per_epoch=steps, verbose=config.verbose, callbacks=[timer], shuffle=False)
    # the first epoch traces and compiles
    return {"pt_examples_per_second": timer.examples_per_second(steps, config.batch_size, skip=1),
            "pt_epoch_seconds": timer.seconds}


def pretrain_meta(config, encoder, data, seed, strategy, arm="meta"):
    """SimCLR whose views pass through the learned warp, meta-learned by MetaPretrainer (arm
    meta_online: with HyperDistill's online term in place of the solve over the PT Hessian);
    returns (record fields, model)."""
    meta_train, meta_val = meta_split(config, data)
    outputs = len(data["classes"])
    with strategy.scope():
        # drawn in the order of pretrain_simclr (projection head, then views), so that the meta
        # arms start from the SimCLR arms' projection head: arms paired by seed share every
        # initial weight they have in common
        projection = projection_head(encoder.output_shape[-1])
        views = make_views(config, data["pt"].shape[1:], seed, config.warp_strength, learned=True)
        warp = views.learned
        if arm == "meta_online":  # PT modelled as SGD at the PT learning rate
            stage = {"online": runner.hyperdistill_estimator(config, config.pt_lr)}
        elif config.solver == "cg":
            stage = {"solve": km.linalg.cg(config.solver_iterations)}
        else:  # alpha=None: the Neumann step is the PT optimizer's learning rate
            stage = {"solve": km.linalg.neumann(config.solver_iterations,
                                                config.neumann_alpha or None)}
        model = km.simclr.simclr_meta_pretrainer(
            encoder, projection, views,
            linear_head(encoder.output_shape[-1], outputs), ft_loss_fn(data["multilabel"]),
            temperature=config.temperature, hyperstep_every=config.hyperstep_every,
            unroll_steps=config.unroll_steps, curvature_iterations=config.curvature_iterations,
            ft_head_updates_statistics=config.ft_head_updates_statistics, **stage)
        groups = [(keras.optimizers.Adam(config.strength_lr), [warp.strength_logit])]
        if config.per_example:
            groups.append((keras.optimizers.Adam(config.magnitude_lr),
                           warp.magnitude_net.trainable_variables))
        model.compile(keras.optimizers.Adam(config.pt_lr), keras.optimizers.Adam(config.ft_lr),
                      groups, jit_compile=config.xla and strategy.num_replicas_in_sync == 1)
    ft_batch = config.ft_batch_size
    stream = km.meta_dataset(batched(data["pt"], config.batch_size, seed),
                             batched(meta_train, min(ft_batch, len(meta_train[0])), seed),
                             batched(meta_val, min(ft_batch, len(meta_val[0])), seed),
                             config.unroll_steps)
    steps = len(data["pt"]) // config.batch_size
    run_dir = runner.run_directory(config, arm, seed)
    timer = EpochTimer(os.path.join(run_dir, "epoch_seconds.json"))  # kept over a resume
    trajectory = StrengthHistory(warp, os.path.join(run_dir, "strength_history.json"))
    model.fit(stream, epochs=config.pt_epochs, steps_per_epoch=steps, verbose=config.verbose,
              callbacks=[timer, trajectory, MetaCheckpoint(os.path.join(run_dir, "ckpt"))])
    # epoch 1 is the warm-up (no hyperstep), epoch 2 compiles the hyperstep
    skip = 2 if config.pt_epochs > 2 else 1
    amplitudes = warp.amplitude(tf.constant(data["pt"][:256])).numpy()
    suffix = "" if arm == "meta" else f"_{arm}"
    fields = {"pt_examples_per_second": timer.examples_per_second(steps, config.batch_size,
                                                                  skip=skip),
              "pt_epoch_seconds": timer.seconds,
              "warp_strength": float(warp.strength.numpy()),
              "warp_strength_by_epoch": [e["strength"] for e in trajectory.epochs],
              "warp_amplitude_quantiles": {q: float(np.quantile(amplitudes, float(q)))
                                           for q in ("0.05", "0.5", "0.95")},
              "warp_png": plot_warp(model.meta_layer, data["pt"], config.modality, os.path.join(
                  config.output_dir, f"warp_{config.modality}{suffix}_seed{seed}.png"))}
    fields.update(runner.hyperdistill_fields(model.online))
    if config.curvature_iterations:  # the mean over an epoch's hypersteps (None: warm-up)
        fields["pt_lambda_max_by_epoch"] = [e.get("pt_lambda_max") for e in trajectory.epochs]
    return fields, model


class StrengthHistory(keras.callbacks.Callback):
    """Per epoch: the warp's global strength after it, and the epoch's mean ``pt_lambda_max``
    when logged (None in epochs without a hyperstep); in ``epochs`` and a JSON file read back
    at the start, so a resumed run keeps the epochs it had."""

    def __init__(self, warp, path):
        super().__init__()
        self.warp, self.path = warp, path
        self.epochs = []

    def on_train_begin(self, logs=None):
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.epochs = json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        entry = {"strength": float(self.warp.strength.numpy())}
        if logs and "pt_lambda_max" in logs:
            hypersteps = float(logs.get("hypersteps", 0.0))
            entry["pt_lambda_max"] = float(logs["pt_lambda_max"]) if hypersteps > 0 else None
        self.epochs = self.epochs[:epoch] + [entry]
        runner.write_json(self.path, self.epochs)


def inference_logits(model, x):
    """The model's logits on x in inference mode, 256 examples at a time."""
    return np.concatenate([model(x[i:i + 256], training=False).numpy()
                           for i in range(0, len(x), 256)])


def test_auroc(model, test, multilabel, num_classes, logits=None):
    """Macro AUROC over the classes with both outcomes in the test set (count returned);
    `logits`, when given, are the model's logits on the test inputs."""
    from sklearn.metrics import roc_auc_score
    x_test, y_test = test
    if logits is None:
        logits = inference_logits(model, x_test)
    if multilabel:
        scores, targets = tf.sigmoid(logits).numpy(), y_test
    else:
        scores = tf.nn.softmax(logits).numpy()
        targets = np.eye(num_classes)[y_test]
    usable = [c for c in range(num_classes) if 0 < targets[:, c].sum() < len(targets)]
    if not usable:
        return float("nan"), 0
    return float(np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in usable])), len(usable)


def meta_split(config, data):
    """(MetaTrain, MetaVal): the labelled examples split as the meta arms split them (the
    first --meta_val_fraction is MetaVal)."""
    x_lab, y_lab = data["labelled"]
    n_val = int(config.meta_val_fraction * len(x_lab))
    return (x_lab[n_val:], y_lab[n_val:]), (x_lab[:n_val], y_lab[:n_val])


def fit_head(config, encoder_weights, labelled, num_classes, multilabel, seed, linear):
    """(model, encoder): a fresh encoder with the given weights (frozen if ``linear``) and a
    fresh linear head, trained on ``labelled`` (x, y) for --ft_epochs at --ft_lr. BatchNorm
    stays in inference mode (its statistics come from PT): stable with a few hundred labels."""
    x, y = labelled
    encoder = make_encoder(config, x.shape[1:])
    encoder.set_weights(encoder_weights)
    encoder.trainable = not linear
    head = linear_head(encoder.output_shape[-1], num_classes)
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, head(encoder(inputs, training=False)), name="finetuned")
    model.compile(keras.optimizers.Adam(config.ft_lr), loss=ft_loss_fn(multilabel))
    model.fit(batched((x, y), min(config.ft_batch_size, len(x)), seed),
              epochs=config.ft_epochs, verbose=0, shuffle=False)
    return model, encoder


def finetune(config, encoder_weights, data, seed, linear):
    """`fit_head` on all labelled examples, scored on the test set."""
    model, encoder = fit_head(config, encoder_weights, data["labelled"], len(data["classes"]),
                              data["multilabel"], seed, linear)
    auroc, scored = test_auroc(model, data["test"], data["multilabel"], len(data["classes"]))
    return runner.FineTuned(auroc, model, encoder, fields={"classes_scored": scored},
                            note=f" (macro over {scored} classes)")


def meta_val_probe(config, encoder_weights, data, seed):
    """What the meta arms' hypergradient aims at, measured for any encoder: a linear head
    fitted on MetaTrain (frozen encoder, the linear-evaluation recipe), its mean FT loss and
    macro AUROC on MetaVal. No test example is read."""
    meta_train, meta_val = meta_split(config, data)
    runner.seed_everything(seed + runner.FT_SEED_OFFSET)
    model, _ = fit_head(config, encoder_weights, meta_train, len(data["classes"]),
                        data["multilabel"], seed, linear=True)
    logits = inference_logits(model, meta_val[0])
    loss = float(ft_loss_fn(data["multilabel"])(tf.constant(meta_val[1]), tf.constant(logits)))
    auroc, _ = test_auroc(model, meta_val, data["multilabel"], len(data["classes"]), logits)
    return {"meta_val_probe_loss": loss, "meta_val_probe_auroc": auroc}


# ----------------------------------------------------------------------------- outputs

def plot_warp(views, x, modality, path):
    """Inputs before and after the learned warp (the same noise draw for each row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    warp = views.learned
    x = tf.constant(x[:4])
    noise = tf.random.normal(warp.noise_shape(tf.shape(x)), seed=0)
    warped = warp.transform(x, noise).numpy()
    magnitude = warp.amplitude(x).numpy()
    if modality == "ecg":
        fig, axes = plt.subplots(len(x), 1, figsize=(10, 2.2 * len(x)), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.plot(x[i, :1000, 1], lw=0.8, label="before (lead II)")
            ax.plot(warped[i, :1000, 1], lw=0.8, label="after the learned warp")
            ax.set_title(f"example {i}: strength x m = {magnitude[i]:.3f}", fontsize=9)
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel("sample (100 Hz)")
    else:
        fig, axes = plt.subplots(2, len(x), figsize=(2.2 * len(x), 4.6), squeeze=False)
        for i in range(len(x)):
            axes[0, i].imshow(x[i, ..., 0], cmap="gray")
            axes[0, i].set_title(f"strength x m {magnitude[i]:.3f}", fontsize=8)
            axes[1, i].imshow(warped[i, ..., 0], cmap="gray")
            for ax in axes[:, i]:
                ax.axis("off")
        axes[0, 0].text(-4, 14, "before", rotation=90, va="center")
        axes[1, 0].text(-4, 14, "after", rotation=90, va="center")
    fig.suptitle("Learned augmentation: inputs before and after the warp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_arm(config, data, strategy, arm, seed):
    """One arm of one seed: the encoder (no PT, SimCLR, SimCLR with a fixed-strength warp or
    with the meta-learned warp), then linear evaluation and full fine-tuning."""
    shape = data["pt"].shape[1:]
    with strategy.scope():
        encoder = make_encoder(config, shape)
    record = {"replicas": strategy.num_replicas_in_sync, "pt_examples": len(data["pt"]),
              "labelled_examples": len(data["labelled"][0]), "test_examples": len(data["test"][0])}
    model = None
    if arm == "simclr" or arm.startswith("fixed_"):
        record.update(pretrain_simclr(config, encoder, data, seed, strategy, arm_strength(arm)))
    elif arm in ("meta", "meta_online"):
        fields, model = pretrain_meta(config, encoder, data, seed, strategy, arm)
        record.update(fields)
    weights = encoder.get_weights()
    record.update(meta_val_probe(config, weights, data, seed))
    runner.log(f"  MetaVal probe (linear head on MetaTrain): loss "
               f"{record['meta_val_probe_loss']:.4f}, AUROC {record['meta_val_probe_auroc']:.4f}")
    tuned = runner.fine_tune(record, seed, ("linear", "full"), lambda linear: finetune(
        config, weights, data, seed, linear))
    if arm == "meta" and seed == config.last_seed:
        spec = tf.TensorSpec((None,) + tuple(shape), tf.float32)
        record["saved_models"] = {
            **runner.export_finetuned(tuned["full"], config.saved_models_dir, config.run_name, spec),
            "meta_parameters": export.export_meta_parameters(model.meta_layer.learned, os.path.join(
                config.saved_models_dir, f"{config.run_name}_meta_parameters.json"))}
    return record


def main(argv):
    del argv
    config, strategy = runner.setup(Config)
    runner.check_online_arm(config, "meta_online", strategy.num_replicas_in_sync)
    data = load_data(config)
    print(f"{config.modality}: {len(data['pt'])} PT examples {data['pt'].shape[1:]}, "
          f"{len(data['labelled'][0])} labelled, {len(data['test'][0])} test, "
          f"{len(data['classes'])} classes; {strategy.num_replicas_in_sync} replica(s)")
    records = runner.run_grid(
        config, lambda arm, seed, _: run_arm(config, data, strategy, arm, seed))
    table, _ = runner.summarise(records, config, ("linear", "full"))
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
