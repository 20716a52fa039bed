r"""Experiment 1: meta-learned PT task weights for a graph network, on real molecules.

Compares, for each seed, three ways to obtain a GIN encoder:
  (a) no_pt:   random initialisation;
  (b) uniform: multitask supervised PT with every task weighted 1;
  (c) meta:    the same PT with per-task weights meta-learned by MetaPretrainer
               (Raghu et al. 2021: Neumann IFT over PT + K unrolled FT-head steps);
  (d) meta_online (optional): as meta, with the PT stage of every hyperstep replaced by
               HyperDistill's online term over the PT run so far (MetaPretrainer(online=...):
               the PT steps modelled as SGD at --pt_lr, damped by --hyperdistill_gamma);
then fine-tunes each on the FT task in two ways, full fine-tuning and linear evaluation
(frozen encoder), and reports test AUROC (mean +- std over seeds) and PT throughput.

Default data, embedded (nothing to download; see keras_metapt.data.embedded): PT molecules
shipped with RDKit plus the FT training molecules, with about 500 PT tasks in three families
(RDKit fr_* fragments, Morgan bits, descriptors above their median); FT task: CHEMBL2321810
activity (pIC50 >= 7), scaffold split, MetaTrain / MetaVal carved from the FT training part.
Own data: --pt_csv (SMILES + label columns) or --pt_tfds (a graph TFDS dataset), and --ft_csv.

Control tasks: --permuted_task_fraction of the PT tasks (default 25%) get their labels permuted
across molecules, so they are known to be useless; the meta arm reports the AUROC of its learned
weights for "task is real", the mean weight of real and permuted tasks per family, the weight
distribution per epoch, and the agreement of hypergradients computed on different batches at
the end (--agreement_batches). The RDKit wheel ships one measured activity set large enough to
fine-tune on (CHEMBL2321810), so there is one FT task.

    python apps/multitask_pt.py                  # CPU-sized default, a few minutes
    python apps/multitask_pt.py --full           # paper-sized GIN, all 15k PT molecules (GPU)

--strategy=mirrored|multiworker|tpu pre-trains (both PT arms) data-parallel: each step takes
one graph batch of --batch_size graphs per replica (padded disjoint batches cannot be split
by example, so R consecutive batches are stacked and tf.distribute hands one to each replica);
fine-tuning and evaluation stay on one device.

Writes <output_dir>/summary.md and summary.json (the AUROC table, timings, per-seed AUROCs and
each arm's mean paired difference to --baseline with a 95% t interval), per-run results under
results/ (a rerun skips finished runs made with the same settings: resumable),
task_weights_seed<k>.png (weights by task family, permuted controls in red), and exports the meta arm's fine-tuned model and encoder of the last
seed as SavedModels under <saved_models_dir>/<run_name>_{finetuned,encoder}/<version>/.
The arms x seeds loop, resume, seeding and summary are apps/runner.py's; a seed fixes a run.
"""

import collections
import dataclasses
import os
import sys
from typing import Optional

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make `apps` importable
    sys.path.insert(0, ROOT)

import keras_metapt as km  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from keras_metapt.callbacks import (EpochTimer, MetaCheckpoint, TaskWeightsHistory,  # noqa: E402
                                    TaskWeightsPlot)
from keras_metapt.data import (EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, batch_graphs, bucket_size,  # noqa: E402
                               embedded, read_molecule_csv, smiles_to_graph)
from keras_metapt.data.graph_files import GraphFileError  # noqa: E402
from keras_metapt.data.splits import SplitError, describe_split, scaffold_split  # noqa: E402
from keras_metapt.data.task_controls import permute_task_labels, weight_auroc  # noqa: E402
from keras_metapt.hyper import TaskWeights  # noqa: E402
from keras_metapt.losses import masked_multitask_bce  # noqa: E402
from keras_metapt.nets import GIN  # noqa: E402

FLAGS = flags.FLAGS
ARMS = ("no_pt", "uniform", "oracle", "meta", "meta_online")
flags.DEFINE_string("pt_csv", None, "PT molecules: CSV with a SMILES column and 0/1 label columns "
                    "(empty cell = missing label). Default: the embedded RDKit benchmark.")
flags.DEFINE_string("pt_tfds", None, "PT molecules as a graph TFDS dataset directory (written by "
                    "keras_metapt.data.tfds_graphs.write_graph_tfds), instead of --pt_csv.")
flags.DEFINE_string("pt_tfds_split", "train", "Split of --pt_tfds to pre-train on.")
flags.DEFINE_string("ft_csv", None, "FT molecules: CSV with a SMILES column and --ft_label_column. "
                    "Default: the embedded CHEMBL2321810 task.")
flags.DEFINE_string("smiles_column", "smiles", "SMILES column name in --pt_csv / --ft_csv.")
flags.DEFINE_string("ft_label_column", "label", "0/1 label column of --ft_csv.")
flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Invalid SMILES or label in a CSV: "
                  "stop with an error naming file and row, or skip the row (counted, warned).")
flags.DEFINE_integer("max_pt_molecules", 3000, "Use at most this many PT molecules (0: all); "
                     "with --ft_in_pt the FT training molecules come on top.")
flags.DEFINE_list("task_families", list(embedded.TASK_FAMILIES), "Embedded benchmark: PT task "
                  "families, out of fragment (RDKit fr_* presence), morgan (radius-2 Morgan bits), "
                  "descriptor (RDKit descriptor above its median).")
flags.DEFINE_float("min_task_rate", 0.02, "Embedded benchmark: keep a PT task when its positive "
                   "rate lies in [rate, 1 - rate].")
flags.DEFINE_bool("ft_in_pt", True, "Embedded benchmark: the FT training molecules join the PT "
                  "pool with their PT labels (as the official code; test molecules never do).")
flags.DEFINE_float("permuted_task_fraction", None, "Share of PT tasks whose labels are permuted "
                   "across molecules (seeded by --split_seed, the same for every seed): control "
                   "tasks known to be useless. The meta arm reports the AUROC of its learned "
                   "weights for 'task is real'. Default: 0.25 on the embedded benchmark, 0 on "
                   "your own --pt_csv/--pt_tfds data (its labels are never permuted unless asked).")
flags.DEFINE_float("test_fraction", 0.2, "Fraction of FT molecules in the scaffold-split test set.")
flags.DEFINE_float("split_tolerance", 0.05, "Largest accepted |test share - --test_fraction| of "
                   "the scaffold split (scaffold groups are indivisible); beyond it the app stops "
                   "with the group sizes instead of running on a lopsided split.")
flags.DEFINE_float("meta_val_fraction", 0.5, "Fraction of the FT training part used as MetaVal "
                   "(the rest is MetaTrain); the final fine-tuning uses the whole training part.")
flags.DEFINE_integer("split_seed", 0, "Seed of the scaffold split (fixed across --seeds).")
flags.DEFINE_integer("num_layers", 3, "GIN layers (paper: 5).")
flags.DEFINE_integer("hidden", 64, "GIN hidden size (paper: 300).")
flags.DEFINE_float("dropout", 0.2, "GIN dropout.")
flags.DEFINE_integer("batch_size", 32, "Graphs per batch (every stream).")
flags.DEFINE_integer("pt_epochs", 4, "PT epochs (the meta arm's first epoch is its warm-up).")
flags.DEFINE_float("pt_lr", 1e-3, "PT Adam learning rate (also the Neumann alpha).")
flags.DEFINE_float("hyper_lr", 0.05, "Adam learning rate of the task-weight logits.")
flags.DEFINE_integer("hyperstep_every", 2, "N: PT steps between hypersteps.")
flags.DEFINE_bool("ft_head_updates_statistics", True, "Meta arms: whether the FT-head steps on "
                  "MetaTrain molecules also update the GIN's BatchNorm moving statistics (as "
                  "PyTorch's train mode does in the official code); "
                  "--noft_head_updates_statistics leaves them to the PT batches, as the "
                  "fixed-weight arms have them.")
flags.DEFINE_integer("unroll_steps", 1, "K: differentiable FT-head steps per hyperstep.")
flags.DEFINE_integer("neumann_terms", 1, "i: Neumann terms of the inverse-Hessian product.")
flags.DEFINE_integer("ft_epochs", 30, "Final fine-tuning epochs (no early stopping on test).")
flags.DEFINE_float("ft_lr", 1e-3, "Adam learning rate of full fine-tuning (and of the meta arm's "
                   "FT head during PT).")
flags.DEFINE_float("linear_lr", 1e-2, "Adam learning rate of linear evaluation (frozen encoder; a "
                   "head alone takes a larger rate, as in the official protocol).")
flags.DEFINE_integer("meta_val_batch_size", 192, "Molecules per MetaVal batch of a hyperstep (0: "
                     "--batch_size); larger batches give a quieter hypergradient (see the "
                     "meta arm's hypergradient_agreement).")
flags.DEFINE_integer("agreement_batches", 4, "After meta-PT, hypergradients on this many stream "
                     "elements after the last step (other MetaVal, MetaTrain and PT batches) at "
                     "the final state: their mean pairwise cosine, also centred over tasks, is "
                     "the reported signal-to-noise check (0: skip, else >= 2; on one device "
                     "only). From 3 on, each task's mean hypergradient is also t-tested "
                     "against 0: the share of real and permuted tasks with a non-zero expected "
                     "hypergradient, and where the weights head in expectation.")
flags.DEFINE_list("seeds", ["0"], "Seeds (model initialisation, data order); a seed fixes a run "
                  "(bit-identical on CPU). One by default, to stay near 10 minutes on 2 CPU "
                  "cores; python -m benchmarks.multitask_graphs runs 5, paired by seed.")
flags.DEFINE_list("arms", ["no_pt", "uniform", "meta"], "Arms to run, out of " + ", ".join(ARMS)
                  + "; oracle pre-trains on the real tasks only (the permuted controls, known "
                  "to be useless, weighted 0); meta_online is meta with HyperDistill's online "
                  "term (the --hyperdistill_* flags) in place of the Neumann solve over PT.")
flags.DEFINE_enum("baseline", "uniform", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with (mean paired per-seed difference, 95% t interval).")
flags.DEFINE_bool("xla", False, "Compile training steps with XLA (jit_compile). Keras compiles "
                  "without XLA while TensorFlow op determinism is on, so --xla turns op "
                  "determinism off: faster, but a seed no longer pins the run bit for bit.")
flags.DEFINE_bool("full", False, "Paper-sized preset: 5 layers, hidden 300, all PT molecules, "
                  "10 PT epochs, 50 FT epochs (meant for a GPU).")
flags.DEFINE_string("output_dir", "runs/multitask_pt", "Results, plots and checkpoints.")
flags.DEFINE_string("saved_models_dir", "saved_models", "Where SavedModels are exported.")
flags.DEFINE_string("run_name", "multitask_pt", "Name prefix of the exported SavedModels.")
flags.DEFINE_bool("resume", True, "Skip runs whose results exist in --output_dir and were made "
                  "with the same settings (others run again).")
# defaults chosen before any run: damping gamma 0.99 (a horizon of ~100 PT steps; the scale
# is fitted to 20-step references), the line's start moved about every PT epoch (100 steps),
# a 20-step reference every 100 PT steps (20 step VJPs on top of the ~50 of the hypersteps)
runner.define_hyperdistill_flags("meta_online", every_default=100, gamma_default=0.99,
                                 reference_steps_default=20, anchor_every_default=100)
runner.define_strategy_flags("pre-training")
runner.define_dtype_policy_flag()
flags.adopt_module_key_flags(runner)
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0 silent, 1 progress bar, 2 per epoch).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort), with the --full preset applied."""

    pt_csv: Optional[str]
    pt_tfds: Optional[str]
    pt_tfds_split: str
    ft_csv: Optional[str]
    smiles_column: str
    ft_label_column: str
    on_error: str
    max_pt_molecules: int
    task_families: tuple
    min_task_rate: float
    ft_in_pt: bool
    permuted_task_fraction: Optional[float]
    test_fraction: float
    split_tolerance: float
    meta_val_fraction: float
    split_seed: int
    num_layers: int
    hidden: int
    dropout: float
    batch_size: int
    pt_epochs: int
    pt_lr: float
    hyper_lr: float
    hyperstep_every: int
    ft_head_updates_statistics: bool
    unroll_steps: int
    neumann_terms: int
    ft_epochs: int
    ft_lr: float
    linear_lr: float
    meta_val_batch_size: int
    agreement_batches: int
    hyperdistill_gamma: float
    hyperdistill_every: int
    hyperdistill_reference_steps: int
    hyperdistill_anchor_every: int
    xla: bool
    dtype_policy: str
    full: bool
    saved_models_dir: str
    run_name: str
    verbose: int

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("saved_models_dir", "run_name", "verbose")
    DATA_PATHS = ("pt_csv", "pt_tfds", "ft_csv")
    BOUNDS = {"max_pt_molecules": "[0, inf)", "test_fraction": "(0, 1)",
              "split_tolerance": "[0, 1]", "meta_val_fraction": "(0, 1)",
              "split_seed": "[0, inf)", "num_layers": "[1, inf)", "hidden": "[1, inf)",
              "dropout": "[0, 1)", "batch_size": "[1, inf)", "pt_epochs": "[1, inf)",
              "pt_lr": "(0, inf)", "hyper_lr": "[0, inf)", "hyperstep_every": "[1, inf)",
              "unroll_steps": "[1, inf)", "neumann_terms": "[0, inf)", "ft_epochs": "[1, inf)",
              "ft_lr": "(0, inf)", "verbose": "[0, 2]", "min_task_rate": "(0, 0.5)",
              "permuted_task_fraction": "[0, 1)", "linear_lr": "(0, inf)",
              "meta_val_batch_size": "[0, inf)", "agreement_batches": "[0, inf)",
              **runner.HYPERDISTILL_BOUNDS}
    # read by the meta arms only: changing it reruns them alone
    ARM_SETTINGS = {"meta": ("ft_head_updates_statistics",),
                    "meta_online": ("ft_head_updates_statistics",)}

    def __post_init__(self):
        super().__post_init__()
        runner.check_online_arm(self, "meta_online")
        if self.agreement_batches == 1:
            raise app.UsageError("--agreement_batches=1: give 0 (skip) or at least 2")
        unknown = [f for f in self.task_families if f not in embedded.TASK_FAMILIES]
        if unknown or not self.task_families:
            raise app.UsageError(f"--task_families={','.join(self.task_families)}: give some of "
                                 f"{', '.join(embedded.TASK_FAMILIES)}")

    def results_config(self):
        """`runner.Config.results_config` and `runner.GIN_RESULTS_ENTRY` (the encoder is a GIN)."""
        return {**super().results_config(), **runner.GIN_RESULTS_ENTRY}

    @classmethod
    def from_flags(cls, flag_values=FLAGS):
        config = super().from_flags(flag_values)
        if config.full:
            config = dataclasses.replace(config, num_layers=5, hidden=300, max_pt_molecules=0,
                                         pt_epochs=10, ft_epochs=50)
        return config


NODE_BUCKETS = tuple(range(256, 1 << 16, 256))
Data = collections.namedtuple("Data", "pt_graphs pt_labels tasks is_real ft_graphs ft_labels "
                                      "train_idx test_idx pt_smiles")


# ----------------------------------------------------------------------------- data

def load_data(config):
    """PT graphs, labels, task names and is_real (False: a permuted control task), FT graphs and
    labels, and the FT scaffold split."""
    if config.pt_csv and config.pt_tfds:
        raise app.UsageError("give --pt_csv or --pt_tfds, not both")
    if config.ft_csv:
        # rows skipped (--on_error=skip) are gone before the split: the split is the same kind
        ft = read_molecule_csv(config.ft_csv, config.smiles_column, [config.ft_label_column],
                               on_error=config.on_error, binary=True, allow_missing=False)
        ft_smiles, ft_graphs, ft_labels = ft.smiles, ft.graphs, ft.labels
    else:
        ft_smiles, ft_labels, _ = embedded.finetuning_set()
        ft_graphs = [smiles_to_graph(s) for s in ft_smiles]
    train_idx, test_idx = scaffold_split(ft_smiles, config.test_fraction, config.split_seed,
                                         config.split_tolerance)
    print(f"FT split (scaffold, seed {config.split_seed}): " + "; ".join(
        describe_split(ft_labels, {"train": train_idx, "test": test_idx}, ft_smiles)))
    if config.pt_csv or config.pt_tfds:
        if config.pt_tfds:
            from keras_metapt.data.tfds_graphs import read_graph_tfds
            pt = read_graph_tfds(config.pt_tfds, config.pt_tfds_split)
            pt_smiles = None
        else:
            pt = read_molecule_csv(config.pt_csv, config.smiles_column, on_error=config.on_error,
                                   binary=True)
            pt_smiles = list(pt.smiles)
        pt_graphs, pt_labels, tasks = pt.graphs, pt.labels, pt.task_names
        if config.max_pt_molecules:
            pt_graphs = pt_graphs[:config.max_pt_molecules]
            pt_labels = pt_labels[:config.max_pt_molecules]
            pt_smiles = pt_smiles and pt_smiles[:config.max_pt_molecules]
    else:
        smiles = embedded.pretraining_smiles(config.max_pt_molecules or None)
        if config.ft_in_pt:
            smiles = smiles + [ft_smiles[i] for i in train_idx]
        cache = os.path.join(config.output_dir, "cache", "pt_task_labels.npz")
        pt_labels, tasks = embedded.pretraining_tasks(smiles, config.task_families,
                                                      config.min_task_rate, cache=cache)
        pt_graphs = [smiles_to_graph(s) for s in smiles]
        pt_smiles = smiles
    fraction = config.permuted_task_fraction
    if fraction is None:
        fraction = 0.0 if (config.pt_csv or config.pt_tfds) else 0.25
    pt_labels, is_real = permute_task_labels(pt_labels, fraction, config.split_seed)
    return Data(pt_graphs, pt_labels, list(tasks), is_real, ft_graphs, ft_labels, train_idx,
                test_idx, pt_smiles)


def task_groups(tasks, pt_from_files):
    """One group name per task for the plot: the embedded family, or "tasks" for own data."""
    return ["tasks"] * len(tasks) if pt_from_files else [embedded.task_family(t) for t in tasks]


def packed(graphs, labels, order, batch_size, node_bucket=None, edge_bucket=None):
    """Static-shape batches (exactly batch_size graphs each) in the given order, stacked."""
    groups = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if node_bucket is None:
        node_bucket = max(bucket_size(sum(len(graphs[i]["node_features"]) for i in g), NODE_BUCKETS) for g in groups)
        edge_bucket = max(bucket_size(sum(len(graphs[i]["edge_index"]) for i in g), NODE_BUCKETS) for g in groups)
    batches = [batch_graphs([graphs[i] for i in g], (node_bucket,), (edge_bucket,)) for g in groups]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return stacked, np.stack([labels[g] for g in groups]).astype(np.float32), node_bucket, edge_bucket


def per_replica(dataset, replicas):
    """R consecutive graph batches stacked on a new leading axis (tf.distribute gives one to
    each replica); unchanged for one replica."""
    return dataset if replicas == 1 else dataset.batch(replicas, drop_remainder=True)


def unstack_replica_axis(tree, replicas):
    """Inside a replica: drop the length-1 replica axis that `per_replica` added."""
    return tree if replicas == 1 else tf.nest.map_structure(lambda t: t[0], tree)


class ReplicaBatch(keras.Model):
    """Wraps a model that takes one graph batch so that it takes a `per_replica` element."""

    def __init__(self, inner, replicas, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.replicas = replicas

    def call(self, x, training=False):
        return self.inner(unstack_replica_axis(x, self.replicas), training=training)


def epochs_dataset(graphs, labels, batch_size, epochs, seed):
    """One tf.data element per batch for ``epochs`` seeded shuffles; static shapes."""
    rng = np.random.default_rng(seed)
    orders = np.concatenate([rng.permutation(len(graphs)) for _ in range(epochs)])
    x, y, nb, eb = packed(graphs, labels, orders, batch_size)
    return tf.data.Dataset.from_tensor_slices((x, y)), len(y) // epochs, (nb, eb)


def test_batches(graphs, labels, idx, batch_size):
    """Test molecules in batches of batch_size, the last one padded with copies (scored, dropped)."""
    pad = (-len(idx)) % batch_size
    order = np.concatenate([idx, np.repeat(idx[:1], pad)])
    x, y, _, _ = packed(graphs, labels, order, batch_size)
    return x, y, len(idx)


def prepare_seed(config, data, seed, replicas=1):
    """What the arms of a seed share: the seeded PT and FT batch orders and the test batches.

    The MetaTrain and MetaVal streams get a fresh seeded shuffle on every pass, as many passes
    as meta-PT (and the agreement check after it) consumes: every hyperstep sees new batches,
    whatever the number of batches per pass and N have in common."""
    pt_graphs, pt_labels, ft_graphs, ft_labels = (data.pt_graphs, data.pt_labels, data.ft_graphs,
                                                  data.ft_labels)
    train_idx, test_idx = data.train_idx, data.test_idx
    train_shuffled = np.random.default_rng(seed).permutation(train_idx)
    n_val = int(config.meta_val_fraction * len(train_shuffled))
    meta_val_idx, meta_train_idx = train_shuffled[:n_val], train_shuffled[n_val:]
    pt_ds, pt_steps, _ = epochs_dataset(pt_graphs, pt_labels, config.batch_size, config.pt_epochs,
                                        seed)
    ft_sets = {}
    elements = config.pt_epochs * pt_steps + config.agreement_batches + 1  # stream elements
    for name, idx in (("train", train_idx), ("meta_train", meta_train_idx), ("meta_val", meta_val_idx)):
        batch = (config.meta_val_batch_size or config.batch_size) if name == "meta_val" \
            else config.batch_size
        per_element = replicas * (config.unroll_steps if name == "meta_train" else 1)
        per_pass = len(idx) // batch
        if per_pass < per_element:
            flag = "--meta_val_batch_size" if name == "meta_val" else "--batch_size"
            raise app.UsageError(
                f"{flag}={batch}: the {name} part ({len(idx)} molecules) gives {per_pass} "
                f"batches a pass, fewer than the {per_element} each step takes (replicas x "
                f"{'K' if name == 'meta_train' else '1'})")
        epochs = config.ft_epochs if name == "train" else \
            -(-elements * per_element // per_pass) + 1
        ft_sets[name] = epochs_dataset([ft_graphs[i] for i in idx], ft_labels[idx], batch,
                                       epochs, seed)
    return {"pt": (pt_ds, pt_steps), "ft": ft_sets,
            "test": test_batches(ft_graphs, ft_labels, test_idx, config.batch_size)}


# ----------------------------------------------------------------------------- models

def make_encoder(config):
    """A GIN; its initialisation comes from the seed the runner set."""
    return GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=config.batch_size,
               num_layers=config.num_layers, hidden=config.hidden, dropout=config.dropout)


def build_on(model, dataset):
    x, _ = next(iter(dataset))
    model(x)
    return model


class Head(keras.Model):
    """encoder -> Dense(outputs); the encoder can be frozen (linear evaluation)."""

    def __init__(self, encoder, outputs, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.dense = keras.layers.Dense(outputs, dtype="float32")  # float32 logits (mixed precision)

    def call(self, x, training=False):
        return self.dense(self.encoder(x, training=training))

    build_batch = None  # a local (x, y) element to build from under a multi-replica strategy

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds from a first batch averaged over replicas, which turns
        # the integer node/edge indices of graph batches into floats; use a local batch.
        if self.build_batch is not None:
            with self.distribute_strategy.scope():
                return self._symbolic_build(data_batch=self.build_batch)
        return super()._maybe_symbolic_build(iterator, data_batch)


def bce(y, logits):
    return masked_multitask_bce(y, logits)


def replica_losses(replicas):
    """PT and FT losses of `per_replica` elements (labels carry the replica axis too)."""
    def pt_loss(y, p, w=None):
        return masked_multitask_bce(unstack_replica_axis(y, replicas), p, w)

    def ft_loss(y, p):
        return masked_multitask_bce(unstack_replica_axis(y, replicas), p)
    return pt_loss, ft_loss


def pretrain_fixed(config, encoder, pt_ds, steps, tasks, strategy, task_weights=None):
    """Multitask PT with fixed task weights (default: all 1)."""
    replicas = strategy.num_replicas_in_sync
    pt_loss = replica_losses(replicas)[0]
    with strategy.scope():
        model = Head(ReplicaBatch(encoder, replicas), len(tasks))
        if replicas > 1:
            model.build_batch = tf.nest.map_structure(lambda t: t[None], next(iter(pt_ds)))
        model.compile(keras.optimizers.Adam(config.pt_lr),
                      loss=lambda y, p: pt_loss(y, p, task_weights),
                      jit_compile=config.xla and replicas == 1)
    timer = EpochTimer()
    steps //= replicas
    model.fit(per_replica(pt_ds, replicas), epochs=config.pt_epochs, steps_per_epoch=steps,
              verbose=config.verbose, callbacks=[timer], shuffle=False)
    # the first epoch traces and compiles
    return {"pt_examples_per_second": timer.examples_per_second(
                steps, config.batch_size * replicas, skip=1),
            "pt_epoch_seconds": timer.seconds, "jit_compile": bool(model.jit_compile)}


def pretrain_meta(config, encoder, pt_ds, steps, data, ft_train, seed, strategy, arm="meta"):
    """MetaPretrainer with TaskWeights (arm meta_online: with HyperDistill's online term in
    place of the Neumann solve); returns the record fields (throughput, weights, their AUROC
    for "task is real", per-epoch distribution, hypergradient agreement)."""
    tasks = data.tasks
    replicas = strategy.num_replicas_in_sync
    pt_loss, ft_loss = replica_losses(replicas)
    with strategy.scope():
        pt_head = keras.Sequential([keras.Input((config.hidden,)), keras.layers.Dense(len(tasks))])
        ft_head = keras.Sequential([keras.Input((config.hidden,)), keras.layers.Dense(1)])
        weights = TaskWeights(len(tasks), task_names=tasks)
        wrapped = ReplicaBatch(encoder, replicas)
        x, _ = next(iter(per_replica(pt_ds, replicas)))
        wrapped(x if replicas == 1 else tf.nest.map_structure(lambda t: t[:1], x))  # builds
        if arm == "meta_online":  # PT modelled as SGD at the PT learning rate
            stage = {"online": runner.hyperdistill_estimator(config, config.pt_lr)}
        else:  # alpha=None: the Neumann step is the PT optimizer's learning rate at each hyperstep
            stage = {"solve": km.linalg.neumann(config.neumann_terms)}
        model = km.MetaPretrainer(wrapped, pt_head, ft_head, weights,
                                  pt_loss=pt_loss, ft_loss=ft_loss,
                                  hyperstep_every=config.hyperstep_every,
                                  unroll_steps=config.unroll_steps,
                                  ft_head_updates_statistics=config.ft_head_updates_statistics,
                                  **stage)
        model.compile(keras.optimizers.Adam(config.pt_lr), keras.optimizers.Adam(config.ft_lr),
                      keras.optimizers.Adam(config.hyper_lr),
                      jit_compile=config.xla and replicas == 1)
    meta_train, meta_val = ft_train
    stream = km.meta_dataset(*(per_replica(ds, replicas) for ds in (pt_ds, meta_train, meta_val)),
                             config.unroll_steps)
    steps //= replicas
    run_dir = runner.run_directory(config, arm, seed)
    timer = EpochTimer(os.path.join(run_dir, "epoch_seconds.json"))  # kept over a resume
    plot_name = (f"task_weights_seed{seed}.png" if arm == "meta"
                 else f"task_weights_{arm}_seed{seed}.png")
    is_real = data.is_real if not data.is_real.all() else None
    history = TaskWeightsHistory(is_real, os.path.join(run_dir, "task_weight_history.json"),
                                 verbose=config.verbose > 0)
    groups = task_groups(tasks, bool(config.pt_csv or config.pt_tfds))
    callbacks = [timer, history, MetaCheckpoint(os.path.join(run_dir, "ckpt")),
                 TaskWeightsPlot(os.path.join(config.output_dir, plot_name),
                                 groups=groups, is_real=is_real)]
    model.fit(stream, epochs=config.pt_epochs, steps_per_epoch=steps, callbacks=callbacks,
              verbose=config.verbose)
    learned = weights.task_weights()
    record = {
        # epoch 1 is the warm-up, epoch 2 compiles the hyperstep
        "pt_examples_per_second": timer.examples_per_second(
            steps, config.batch_size * replicas, skip=2),
        "pt_epoch_seconds": timer.seconds,
        "task_weights": {t: float(w) for t, w in zip(tasks, learned)},
        "task_weight_history": history.epochs,
        "jit_compile": bool(model.jit_compile),
        **runner.hyperdistill_fields(model.online),
        "mean_task_weight": {f"{g} {kind}": float(learned[mask].mean())
                             for g in dict.fromkeys(groups)
                             for kind, mask in (("real", (np.array(groups) == g) & data.is_real),
                                                ("permuted", (np.array(groups) == g) & ~data.is_real))
                             if mask.any()}}
    if is_real is not None:  # control tasks: how well do the weights find them
        record.update(permuted_tasks=[t for t, real in zip(tasks, is_real) if not real],
                      task_weight_auroc_real=weight_auroc(learned, is_real),
                      task_weight_moved_auroc_real=weight_auroc(np.abs(learned - 1.0), is_real))
    if config.agreement_batches >= 2 and replicas == 1:  # (computed on one device)
        record["hypergradient_agreement"] = hypergradient_agreement(
            model, stream.skip(config.pt_epochs * steps), config.agreement_batches, is_real,
            learned)
    return record


def hypergradient_agreement(model, stream, count, is_real=None, task_weights=None):
    """Hypergradients at the current state on ``count`` stream elements (other MetaVal,
    MetaTrain and fresh PT batches than each other: the streams reshuffle every pass): mean
    pairwise cosine similarity, the same after removing each hypergradient's mean over tasks,
    and the share of tasks whose hypergradient has the same sign on every element (about
    1/2^(count-1) for pure noise).

    With ``is_real`` (False: a permuted control) and count >= 3, also per task the t test of
    its mean hypergradient g_t against 0 (t = mean / (std / sqrt(n)), n - 1 degrees of
    freedom, two-sided, 5%). The expectation is over the stream's batches of the fixed
    MetaVal, MetaTrain and PT sets. Reported: per task the mean and t; the share of real and
    of permuted tasks whose expected hypergradient is not 0; among real tasks that pass the
    test, the share with mean < 0 (the weight, descending g_t, rises in expectation); the
    AUROC for "task is real" of -t (the weights' expected direction, scaled per task as Adam
    scales it) and of |t| (how sure the move is). With ``task_weights`` (the learned values),
    also the share of the tasks that pass the test whose weight has moved from 1 the way
    -mean points (over those whose weight moved at all)."""
    compute = tf.function(lambda element: model.hypergradient(element).hypergrad[0])
    grads = np.stack([compute(element).numpy() for element in stream.take(count)])
    n = len(grads)

    def mean_cosine(g):
        unit = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
        return float((unit @ unit.T)[np.triu_indices(n, 1)].mean())
    signs = np.sign(grads)
    out = {"batches": n, "mean_cosine": mean_cosine(grads),
           # without the component shared by all tasks (raise or lower every weight)
           "mean_centred_cosine": mean_cosine(grads - grads.mean(axis=1, keepdims=True)),
           "same_sign_share": float((np.abs(signs.sum(0)) == n).mean())}
    if is_real is not None and n >= 3:
        from scipy import stats
        is_real = np.asarray(is_real, bool)
        mean = grads.mean(0)
        t = runner.one_sample_t(grads)
        significant = np.abs(t) > stats.t.ppf(0.975, n - 1)
        out.update(task_mean=mean.tolist(), task_t=t.tolist())
        for name, mask in (("real", is_real), ("permuted", ~is_real)):
            out[f"{name}_significant_share"] = float(significant[mask].mean())
        real_significant = significant & is_real
        if real_significant.any():
            out["real_significant_raised_share"] = float((mean[real_significant] < 0).mean())
        out["expected_direction_auroc_real"] = weight_auroc(-t, is_real)
        out["expected_size_auroc_real"] = weight_auroc(np.abs(t), is_real)
        if task_weights is not None:
            moved = np.sign(np.asarray(task_weights, np.float64) - 1.0)
            counted = significant & (moved != 0)  # (weights that never moved say nothing)
            if counted.any():
                out["significant_weight_follows_share"] = float(
                    (moved[counted] == -np.sign(mean[counted])).mean())
    return out


def finetune(config, encoder_weights, ft_train, test, linear):
    """Fresh encoder with the given weights + fresh head, trained on the FT training part."""
    from sklearn.metrics import roc_auc_score
    ft_train_ds, ft_steps = ft_train[:2]
    encoder = make_encoder(config)
    model = Head(encoder, 1)
    build_on(model, ft_train_ds)
    encoder.set_weights(encoder_weights)
    encoder.trainable = not linear
    model.compile(keras.optimizers.Adam(config.linear_lr if linear else config.ft_lr), loss=bce,
                  jit_compile=config.xla)
    model.fit(ft_train_ds, epochs=config.ft_epochs, steps_per_epoch=ft_steps, verbose=0,
              shuffle=False)
    x_test, y_test, n_test = test
    scores = np.concatenate([model.predict_on_batch({k: v[i] for k, v in x_test.items()})[:, 0]
                             for i in range(len(y_test))])[:n_test]
    auroc = float(roc_auc_score(y_test.reshape(-1)[:n_test], scores))
    return runner.FineTuned(auroc, model, model.encoder)


# ----------------------------------------------------------------------------- main

def run_arm(config, data, strategy, arm, seed, shared):
    """One arm of one seed: the encoder (no PT, uniform PT or meta-PT), then both fine-tunings."""
    tasks = data.tasks
    pt_ds, pt_steps = shared["pt"]
    with strategy.scope():  # the encoder's variables are created on its first call
        encoder = make_encoder(config)
        if arm != "no_pt":
            build_on(encoder, pt_ds)
    record = {"replicas": strategy.num_replicas_in_sync}
    if arm == "uniform":
        record.update(pretrain_fixed(config, encoder, pt_ds, pt_steps, tasks, strategy))
    elif arm == "oracle":  # 0 on the permuted tasks: the loss is the mean over the real ones
        weights = data.is_real.astype(np.float32) * len(tasks) / data.is_real.sum()
        record.update(pretrain_fixed(config, encoder, pt_ds, pt_steps, tasks, strategy,
                                     tf.constant(weights)))
    elif arm in ("meta", "meta_online"):
        ft_train = (shared["ft"]["meta_train"][0], shared["ft"]["meta_val"][0])
        record.update(pretrain_meta(config, encoder, pt_ds, pt_steps, data, ft_train, seed,
                                    strategy, arm))
    else:
        build_on(encoder, pt_ds)
    weights = encoder.get_weights()
    tuned = runner.fine_tune(record, seed, ("full", "linear"), lambda linear: finetune(
        config, weights, shared["ft"]["train"], shared["test"], linear))
    if arm == "meta" and seed == config.last_seed:
        spec = km.export.GraphRequestSpec(config.batch_size, NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES)
        record["saved_models"] = runner.export_finetuned(tuned["full"], config.saved_models_dir,
                                                         config.run_name, spec)
    return record


def main(argv):
    del argv
    config, strategy = runner.setup(Config)
    runner.check_online_arm(config, "meta_online", strategy.num_replicas_in_sync)
    if strategy.num_replicas_in_sync > 1:
        print(f"Pre-training on {strategy.num_replicas_in_sync} replicas ({config.strategy}); "
              f"global batch {strategy.num_replicas_in_sync} x {config.batch_size} graphs")
    try:
        data = load_data(config)
    except (GraphFileError, SplitError) as error:
        sys.exit(f"multitask_pt: {error}")
    if "oracle" in config.arms and data.is_real.all():
        raise app.UsageError("--arms=oracle needs permuted control tasks "
                             "(--permuted_task_fraction > 0)")
    print(f"PT: {len(data.pt_graphs)} molecules, {len(data.tasks)} tasks "
          f"({(~data.is_real).sum()} permuted controls); FT: {len(data.ft_graphs)} molecules "
          f"({len(data.train_idx)} train, {len(data.test_idx)} test)")
    records = runner.run_grid(
        config, lambda arm, seed, shared: run_arm(config, data, strategy, arm, seed, shared),
        prepare=lambda seed: prepare_seed(config, data, seed, strategy.num_replicas_in_sync))
    table, _ = runner.summarise(records, config, ("full", "linear"))
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
