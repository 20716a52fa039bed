r"""Meta-learning across a task family: MAML, first-order MAML, Reptile, ARUBA, CTS and
WarpGrad against training from scratch and multitask pre-training + fine-tuning, on N-way
K-shot (or many-shot) classification tasks with disjoint meta-training and meta-test classes,
or on binary molecular property tasks with disjoint meta-training and meta-test tasks.

Families (all offline):
- fashion_mnist: Fashion-MNIST's training images (IDX files in --images_dir, 28x28);
- digits: scikit-learn's bundled handwritten digits (1,797 8x8 images of 0-9, in [0, 1]).
--num_test_classes of the ten classes (drawn by --split_seed, the same for every seed) are
held out for meta-testing; meta-training episodes use only the others. With --rotations=4
every class c also gives three new classes, its images rotated by 90, 180 and 270 degrees
(c + 10, c + 20, c + 30), on the same side of the split (the class augmentation of the
Omniglot experiments of Santoro et al. 2016 and MAML): ten classes become forty.
- molecules: the first --num_molecules of the molecules shipped with RDKit (NCI first 5K and
  the PAINS test set, shuffled; at most --max_atoms heavy atoms) and their binary property
  tasks computed by RDKit (--task_families: presence of each fr_* fragment, each descriptor
  above its median), as the graph pre-training experiment builds them. Tasks with too few
  positives or negatives for an episode are dropped; --num_test_tasks of the rest (drawn by
  --split_seed) are meta-test tasks. An episode is one task, balanced: --k_shot negatives and
  positives in the support, --n_query of each in the query (--n_way must be 2). The learner
  is a GIN (--gin_layers, --gin_hidden; keras_metapt.taskmeta.GINTaskModel) with a zero
  linear head, and the test metric the query AUROC. Related descriptors (e.g. molecular
  weight and heavy-atom count) may fall on both sides of the task split: the meta-test
  tasks are new tasks, not an unrelated domain.

Every arm adapts to a task by SGD (--inner_lr; ARUBA: its learned per-coordinate rates) on
the task's support set from an initialisation of the same conv classifier
(keras_metapt.taskmeta.classifier: --blocks blocks of conv 3x3 -> batch normalisation over
the batch -> ReLU -> max-pool, --width channels, zero linear head):
- scratch: the seed's random initialisation, not meta-trained;
- pretrain_finetune: the encoder pre-trained by Adam (--meta_lr) on the pooled examples of
  each meta-batch's tasks with their original labels (one head over the meta-training
  classes), then a fresh zero head per task;
- maml / fomaml: second-order MAML (through keras_metapt.Unrolled) / first-order MAML, an
  Adam step (--meta_lr) on the mean query-loss meta-gradient of --meta_batch episodes after
  --inner_steps SGD steps on their supports;
- reptile: phi += --meta_step_size * (mean adapted weights - phi);
- aruba: Reptile whose SGD uses ARUBA's per-coordinate step sizes (--aruba_zeta,
  --aruba_power; initial rate --inner_lr);
- cts: Continual Trajectory Shifting: Reptile's step (--cts_meta_step_size) after every
  --cts_update_every inner steps, each task's trajectory shifted with the initialisation;
- warpgrad: the classifier with a warp layer (a linear 3x3 convolution, identity at first)
  after every block; adaptation moves only the task layers; the warps take SGD steps
  (--warp_lr) on WarpGrad's objective at --warpgrad_points points of each task's
  trajectory (--warpgrad_batch points per step; the second step on the query set), and the
  initialisation the authors' simplified Leap step (--warpgrad_init_lr), or with
  --warpgrad_init=first_order_maml first-order MAML through the warped learner (Adam at
  --meta_lr).
Every arm of a seed starts from the same initialisation and sees the same training episodes,
for --meta_steps meta-steps (equal steps; the seconds per meta-step are reported, since they
differ by method), or for its own count (--meta_steps_per_arm, e.g. set for an equal
wall-clock by `python -m benchmarks.task_meta_learning`).

Many-shot tasks: set --k_shot to hundreds and --inner_batch > 0: each inner step then takes a
minibatch of --inner_batch support examples (drawn per step), for --inner_steps (e.g. >= 100)
steps.

Test: --test_episodes episodes of the held-out classes for each of --test_shots (the same
episodes for every arm and seed), --test_inner_steps SGD steps from the arm's
initialisation, query accuracy.

    python apps/task_meta_learning.py --family=digits --blocks=2          # CPU, 5 seeds
    python apps/task_meta_learning.py --arms=scratch,reptile,aruba --seeds=0,1,2

Writes <output_dir>/summary.md and summary.json (per arm: mean test accuracy +- std over
seeds per shot count; paired differences to --baseline with 95% t intervals over seeds; the
mean 95% interval of a seed's accuracy over its test episodes; seconds per meta-step) and
task_meta_learning.png. Every (arm, seed) checkpoints every --checkpoint_every meta-steps
under <output_dir>/<arm>_seed<k> and resumes from there; finished arms are reused
(runner.run_grid). A seed fixes a run: bit-identical on CPU.
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

import keras_metapt as km  # noqa: E402,F401  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from keras_metapt import tasks, taskmeta  # noqa: E402
from keras_metapt.data import embedded  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.data.molecules import smiles_to_graph  # noqa: E402
from keras_metapt.hypergrad import StepBatches  # noqa: E402
from keras_metapt.taskmeta import graph_classifier  # noqa: E402

FLAGS = flags.FLAGS
ARMS = ("scratch", "pretrain_finetune", "maml", "fomaml", "reptile", "aruba", "cts",
        "warpgrad")
SUPPORT_ONLY = ("pretrain_finetune", "reptile", "aruba", "cts")  # no use of query sets
FAMILIES = ("fashion_mnist", "digits", "molecules")
TRAIN_STREAM, TEST_STREAM = 0, 1
MOLECULE_FIELDS = ("num_molecules", "max_atoms", "task_families", "num_test_tasks",
                   "gin_layers", "gin_hidden")
IMAGE_FIELDS = ("images_dir", "images_dir_sha256", "num_test_classes", "rotations", "width",
                "blocks")
MINIBATCH_TAG = 107  # the NumPy stream of many-shot inner minibatches

flags.DEFINE_enum("family", "fashion_mnist", list(FAMILIES), "Task family: Fashion-MNIST "
                  "classes (IDX files in --images_dir), scikit-learn's 8x8 digits, or binary "
                  "property tasks of RDKit's shipped molecules (--n_way=2).")
flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Folder of MNIST-layout IDX "
                    "files (--family=fashion_mnist); default Debian's package.")
flags.DEFINE_integer("num_test_classes", 5, "Classes held out for meta-testing (the rest "
                     "are meta-training classes).")
flags.DEFINE_integer("num_molecules", 2000, "Molecules of the molecule family (the first of "
                     "RDKit's shipped set, shuffled with seed 0).")
flags.DEFINE_integer("max_atoms", 32, "Molecule family: larger molecules are dropped (graph "
                     "sets are padded to this many atoms per molecule).")
flags.DEFINE_list("task_families", ["fragment", "descriptor"], "Molecule family: RDKit task "
                  "families (fragment, descriptor, morgan).")
flags.DEFINE_integer("num_test_tasks", 40, "Molecule family: tasks held out for meta-testing.")
flags.DEFINE_integer("gin_layers", 3, "Molecule family: GIN layers.")
flags.DEFINE_integer("gin_hidden", 64, "Molecule family: GIN width.")
flags.DEFINE_enum("rotations", "1", ["1", "2", "4"], "Classes per original class: its "
                  "images rotated by multiples of 360 / rotations degrees (1: no new classes).")
flags.DEFINE_integer("split_seed", 0, "Seed of the meta-train / meta-test class split (the "
                     "same for every seed).")
flags.DEFINE_list("arms", list(ARMS), "Arms to run, out of " + ", ".join(ARMS) + ".")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (initialisation, training "
                  "episodes); every arm of a seed sees the same.")
flags.DEFINE_enum("baseline", "scratch", list(ARMS), "Arm that summary.md/json compare every "
                  "other arm with, paired by seed.")
flags.DEFINE_integer("n_way", 5, "Classes per task (training and test).")
flags.DEFINE_integer("k_shot", 1, "Support examples per class of training tasks.")
flags.DEFINE_integer("n_query", 15, "Query examples per class of training tasks (MAML's "
                     "meta-objective).")
flags.DEFINE_integer("inner_steps", 5, "SGD steps per task during meta-training.")
flags.DEFINE_float("inner_lr", 0.05, "SGD step size of task adaptation (ARUBA: the initial "
                   "per-coordinate rate).")
flags.DEFINE_integer("inner_batch", 0, "Support examples per inner step; 0: the whole "
                     "support set every step (few-shot), > 0: minibatches (many-shot).")
flags.DEFINE_integer("meta_steps", 300, "Meta-steps per arm.")
flags.DEFINE_list("meta_steps_per_arm", [], "Meta-steps of named arms, as arm:steps "
                  "(e.g. maml:40,reptile:160), in place of --meta_steps for those arms: an "
                  "equal meta-training wall-clock across methods (benchmarks.task_meta_learning "
                  "sets it from measured seconds per meta-step).")
flags.DEFINE_integer("meta_batch", 4, "Tasks per meta-step.")
flags.DEFINE_float("meta_lr", 1e-3, "Adam rate of MAML, first-order MAML and the "
                   "pre-training.")
flags.DEFINE_float("meta_step_size", 0.5, "Reptile's and ARUBA's interpolation step epsilon.")
flags.DEFINE_float("cts_meta_step_size", 0.1, "CTS: phi's step toward the tasks' mean after "
                   "each update (beta; --inner_steps / --cts_update_every updates per "
                   "meta-step).")
flags.DEFINE_integer("cts_update_every", 1, "CTS: inner steps between initialisation updates.")
flags.DEFINE_bool("zero_head", False, "Meta-learning arms learn the encoder's initialisation "
                  "only: the linear head starts every task at zero (labels are permuted from "
                  "task to task, so a learned head initialisation can only be a bias).")
flags.DEFINE_bool("query_in_support", False, "Meta-training: pretrain_finetune, reptile, "
                  "aruba and cts, which use no query set, train on each task's support and "
                  "query examples (the labelled examples MAML and WarpGrad see).")
flags.DEFINE_float("warp_lr", 0.1, "WarpGrad: SGD step size of the warp layers.")
flags.DEFINE_float("warpgrad_init_lr", 0.1, "WarpGrad: step size of the initialisation's "
                   "Leap update (0: the initialisation stays at the seed's random one).")
flags.DEFINE_enum("warpgrad_init", "leap", ["leap", "first_order_maml"], "WarpGrad: how the "
                  "initialisation is meta-learned: the authors' simplified Leap step "
                  "(--warpgrad_init_lr), or first-order MAML through the warped learner "
                  "(Adam at --meta_lr on the query gradient at each task's adapted weights; "
                  "the paper's few-shot pairing, Warp-MAML, in first-order form).")
flags.DEFINE_integer("warpgrad_points", 0, "WarpGrad: trajectory points buffered per task, "
                     "evenly spaced (0: every inner step).")
flags.DEFINE_integer("warpgrad_batch", 1, "WarpGrad: buffered points per warp step (the "
                     "authors: 1; 0: all of a meta-step's points, one step).")
flags.DEFINE_float("aruba_zeta", 1.0, "ARUBA's zeta (G's initial square root).")
flags.DEFINE_float("aruba_power", 1.0, "ARUBA's p (the (t + 1)^-p smoothing).")
flags.DEFINE_integer("width", 32, "Channels of every conv block.")
flags.DEFINE_integer("blocks", 4, "Conv blocks (each halves the image side; digits: <= 3).")
flags.DEFINE_list("test_shots", ["1", "5"], "Support examples per class of the test tasks; "
                  "one accuracy per entry.")
flags.DEFINE_integer("test_n_query", 15, "Query examples per class of test tasks.")
flags.DEFINE_integer("test_inner_steps", 10, "SGD steps of a test task's adaptation.")
flags.DEFINE_integer("test_episodes", 200, "Test tasks per shot count.")
flags.DEFINE_integer("test_seed", 0, "Seed of the test tasks (the same for every arm, seed).")
flags.DEFINE_integer("checkpoint_every", 50, "Meta-steps between checkpoints (and log lines).")
flags.DEFINE_string("output_dir", "runs/task_meta_learning", "Results, plot and checkpoints.")
flags.DEFINE_bool("resume", True, "Reuse finished (arm, seed) results and resume unfinished ones "
                  "from their last checkpoint, when made with the same settings.")
flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar; 2: a line per checkpoint.")
flags.DEFINE_bool("plot", True, "Write task_meta_learning.png.")
runner.define_strategy_flags("meta-training (only the default, one device, is supported here)")
flags.adopt_module_key_flags(runner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort)."""

    family: str
    images_dir: str
    num_molecules: int
    max_atoms: int
    task_families: tuple
    num_test_tasks: int
    gin_layers: int
    gin_hidden: int
    num_test_classes: int
    rotations: str
    split_seed: int
    n_way: int
    k_shot: int
    n_query: int
    inner_steps: int
    inner_lr: float
    inner_batch: int
    meta_steps: int
    meta_steps_per_arm: tuple
    meta_batch: int
    meta_lr: float
    meta_step_size: float
    cts_meta_step_size: float
    cts_update_every: int
    zero_head: bool
    query_in_support: bool
    warp_lr: float
    warpgrad_init_lr: float
    warpgrad_init: str
    warpgrad_points: int
    warpgrad_batch: int
    aruba_zeta: float
    aruba_power: float
    width: int
    blocks: int
    test_shots: tuple
    test_n_query: int
    test_inner_steps: int
    test_episodes: int
    test_seed: int
    checkpoint_every: int
    verbose: int
    plot: bool

    ARMS = ARMS
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose", "plot", "checkpoint_every")
    DATA_PATHS = ("images_dir",)
    ARM_SETTINGS = {"warpgrad": ("warp_lr", "warpgrad_init_lr", "warpgrad_init",
                                 "warpgrad_points", "warpgrad_batch"),
                    "cts": ("cts_meta_step_size", "cts_update_every"),
                    "aruba": ("aruba_zeta", "aruba_power")}
    BOUNDS = {"num_test_classes": "[2, 8]", "num_molecules": "[50, 15000]",
              "max_atoms": "[2, inf)", "num_test_tasks": "[1, inf)", "gin_layers": "[1, 8]",
              "gin_hidden": "[1, inf)", "split_seed": "[0, inf)", "n_way": "[2, 10]",
              "k_shot": "[1, inf)", "n_query": "[1, inf)", "inner_steps": "[1, inf)",
              "inner_lr": "(0, inf)", "inner_batch": "[0, inf)", "meta_steps": "[1, inf)",
              "meta_batch": "[1, inf)", "meta_lr": "(0, inf)", "meta_step_size": "(0, 1]",
              "cts_meta_step_size": "(0, 1]", "cts_update_every": "[1, inf)",
              "warp_lr": "(0, inf)", "warpgrad_init_lr": "[0, inf)",
              "warpgrad_points": "[0, inf)", "warpgrad_batch": "[0, inf)",
              "aruba_zeta": "(0, inf)", "aruba_power": "(-inf, inf)", "width": "[1, inf)",
              "blocks": "[1, 5]", "test_n_query": "[1, inf)", "test_inner_steps": "[1, inf)",
              "test_episodes": "[1, inf)", "test_seed": "[0, inf)",
              "checkpoint_every": "[1, inf)", "verbose": "[0, 2]"}

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "default":
            raise app.UsageError(f"--strategy={self.strategy}: this app runs on one device")
        object.__setattr__(self, "test_shots", runner.distinct_counts("test_shots",
                                                                      self.test_shots))
        if self.cts_update_every > self.inner_steps:
            raise app.UsageError(f"--cts_update_every={self.cts_update_every}: at most "
                                 f"--inner_steps={self.inner_steps}")
        object.__setattr__(self, "meta_steps_per_arm",
                           tuple(f"{a}:{n}" for a, n in self.steps_by_arm().items()))
        families = tuple(self.task_families)
        if not families or set(families) - set(embedded.TASK_FAMILIES):
            raise app.UsageError(f"--task_families={','.join(families)}: give some of "
                                 f"{', '.join(embedded.TASK_FAMILIES)}")
        object.__setattr__(self, "task_families", families)
        if self.family == "molecules":
            if self.n_way != 2 or self.rotations != "1":
                raise app.UsageError(f"--family=molecules: tasks are binary, so --n_way=2 "
                                     f"and --rotations=1 (got {self.n_way}, {self.rotations})")
            return
        r = int(self.rotations)
        if self.n_way > r * min(self.num_test_classes, 10 - self.num_test_classes):
            raise app.UsageError(
                f"--n_way={self.n_way} needs that many classes on both sides of the split: "
                f"--num_test_classes={self.num_test_classes} and --rotations={r} give "
                f"{r * (10 - self.num_test_classes)} meta-training and "
                f"{r * self.num_test_classes} meta-test classes")

    def data_paths(self):
        """--images_dir is read by the image families only (not digested for molecules)."""
        return () if self.family == "molecules" else self.DATA_PATHS

    def results_config_of(self, arm):
        """An arm's settings: --meta_steps_per_arm resolved to its own count, as meta_steps
        (so a count changed for one arm reruns that arm only, and results stored before the
        flag existed are still recognised); the settings of WarpGrad, CTS and ARUBA only in
        their own arm's (``ARM_SETTINGS``: --warp_lr=0.01 reruns WarpGrad alone)."""
        config = super().results_config_of(arm)  # without the other arms' own settings
        del config["meta_steps_per_arm"]
        # the settings of the other kind of family do not affect this one's results
        for name in (IMAGE_FIELDS if self.family == "molecules" else MOLECULE_FIELDS):
            config.pop(name, None)
        config["meta_steps"] = self.meta_steps_of(arm)
        if config.get("warpgrad_init") == "leap":  # WarpGrad's results stored before the flag
            del config["warpgrad_init"]
        if self.family == "molecules":  # the learner is a GIN
            config.update(runner.GIN_RESULTS_ENTRY)
        return config

    def steps_by_arm(self):
        """{arm: meta-steps} of --meta_steps_per_arm (arms not named run --meta_steps)."""
        out = {}
        for item in self.meta_steps_per_arm:
            arm, _, count = str(item).partition(":")
            try:
                count = int(count)
            except ValueError:
                count = 0
            if arm not in self.arms or count < 1 or arm in out:
                raise app.UsageError(
                    f"--meta_steps_per_arm={','.join(self.meta_steps_per_arm)}: give distinct "
                    f"arm:steps items, steps >= 1, arms out of --arms ({', '.join(self.arms)}) "
                    f"(bad item: {item!r})")
            out[arm] = count
        return dict(sorted(out.items()))

    def meta_steps_of(self, arm):
        """The meta-steps of ``arm``: its --meta_steps_per_arm entry, else --meta_steps."""
        return self.steps_by_arm().get(arm, self.meta_steps)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Family:
    """A family's episode samplers and how its examples reach its learner (`ImageFamily`,
    `MoleculeFamily`)."""
    train: object                       # meta-training episodes (a sampler)
    test: dict                          # k_shot -> sampler over the held-out classes / tasks
    train_classes: np.ndarray           # meta-training classes (molecules: task columns)
    test_classes: np.ndarray

    def inputs(self, examples):
        """The learner's input nest for ``examples`` [..., n, <example>] (leading dimensions
        kept)."""
        raise NotImplementedError

    def original_labels(self, episode, part):
        """Labels of the pre-training head for the ``part`` ("support" or "query") of
        ``episode``."""
        raise NotImplementedError

    def pretraining_batch(self, examples, original):
        """(inputs, labels) of multitask pre-training on a meta-batch's examples [M, n, ...]
        with their `original_labels`."""
        return self.inputs(examples), tf.constant(original)

    def build_model(self, model, config, seed, warped):
        """Sets ``model``'s (a `TaskModel`) params, warp_params, loss, warped_loss and
        pretraining_outputs for this family's learner."""
        raise NotImplementedError

    def query_score(self, model, params, warp_params, query, labels):
        """The adapted ``params``' score on one query set (inputs nest, labels)."""
        raise NotImplementedError

    def describe(self, config):
        """A log line naming the meta-training and meta-test classes (tasks)."""
        raise NotImplementedError


@dataclasses.dataclass
class ImageFamily(Family):
    """Episodes hold images [..., n, H, W, C]; the learner is the conv classifier; the score is
    query accuracy."""
    image_shape: tuple

    def inputs(self, examples):
        return tf.constant(examples)

    def original_labels(self, episode, part):
        """The original classes."""
        return episode.classes[getattr(episode, f"{part}_labels")]

    def build_model(self, model, config, seed, warped):
        del warped  # the conv learner's warps are separate parameters, identity at first
        model.params = taskmeta.conv_classifier_params(
            config.n_way, self.image_shape, width=config.width, blocks=config.blocks, seed=seed)
        model.warp_params = taskmeta.identity_warp_params(config.width, config.blocks)
        model.loss = taskmeta.classification_loss
        model.warped_loss = taskmeta.warped_classification_loss
        # every original label (10 per rotation); the meta-test classes never occur
        model.pretraining_outputs = 10 * int(config.rotations)

    def query_score(self, model, params, warp_params, query, labels):
        return float(taskmeta.classification_accuracy(params, query, tf.constant(labels),
                                                      warp_params))

    def describe(self, config):
        return (f"{config.family}: meta-training classes {self.train_classes.tolist()}, "
                f"meta-test classes {self.test_classes.tolist()}")


@dataclasses.dataclass
class MoleculeFamily(Family):
    """Episodes hold row indices into ``graphs`` / ``labels`` (tasks are label columns); the
    learner is a GIN (`taskmeta.GINTaskModel`); the score is query AUROC."""
    graphs: list                        # one graph per row
    labels: np.ndarray                  # [rows, tasks] 0/1
    task_names: list
    max_nodes: int                      # the padding per graph
    max_edges: int

    def inputs(self, examples):
        """The rows as packed graph sets (`taskmeta.pack_graph_sets`)."""
        rows = np.asarray(examples)
        packed = graph_classifier.pack_graph_sets(self.graphs, rows.reshape(-1, rows.shape[-1]),
                                                  self.max_nodes, self.max_edges)
        return {k: tf.constant(v.reshape(rows.shape[:-1] + v.shape[1:]))
                for k, v in packed.items()}

    def original_labels(self, episode, part):
        """The labels of every meta-training task, [n, tasks]."""
        return self.labels[getattr(episode, part)][:, self.train_classes]

    def pretraining_batch(self, examples, original):
        """The meta-batch's molecules pooled as one set (M = 1)."""
        return super().pretraining_batch(examples.reshape(1, -1),
                                         original.reshape(1, -1, original.shape[-1]))

    def build_model(self, model, config, seed, warped):
        model.gin = taskmeta.GINTaskModel(num_layers=config.gin_layers, hidden=config.gin_hidden,
                                          warp_layers=warped, seed=seed)
        model.params = model.gin.initial_params()
        model.warp_params = model.gin.initial_warp_params()
        model.loss, model.warped_loss = model.gin.loss, model.gin.warped_loss
        # the pre-training head: one output per meta-training task
        model.pretraining_outputs = len(self.train_classes)

    def query_score(self, model, params, warp_params, query, labels):
        logits = model.gin.logits(params, query, warp_params)[:, 0]
        return taskmeta.binary_auroc(logits.numpy(), labels)

    def describe(self, config):
        return "meta-test tasks: " + ", ".join(self.task_names[t] for t in self.test_classes)


def load_family(config):
    """The class (or task) split and the episode samplers of the family."""
    if config.family == "molecules":
        return load_molecules(config)
    if config.family == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[..., None]
        y = digits.target.astype(np.int32)
    else:
        (x, y), _ = image_data.load_idx_dataset(config.images_dir)
        x = x.astype(np.float32)
    r = int(config.rotations)
    # a 6 turned by 180 degrees is a 9: with rotations, both on one side of the split
    together = ((6, 9),) if config.family == "digits" and r > 1 else ()
    train_classes, test_classes = tasks.split_classes(np.unique(y), config.num_test_classes,
                                                      config.split_seed, together)
    if r > 1:
        x, y = rotated_classes(x, y, r)
        train_classes = np.concatenate([train_classes + 10 * i for i in range(r)])
        test_classes = np.concatenate([test_classes + 10 * i for i in range(r)])
    try:
        train = tasks.EpisodeSampler(x, y, train_classes, n_way=config.n_way,
                                     k_shot=config.k_shot, n_query=config.n_query,
                                     name=f"{config.family} meta-training classes")
        test = {k: tasks.EpisodeSampler(x, y, test_classes, n_way=config.n_way, k_shot=k,
                                        n_query=config.test_n_query,
                                        name=f"{config.family} meta-test classes ({k}-shot)")
                for k in config.test_shots}
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    return ImageFamily(train, test, train_classes, test_classes, image_shape=x.shape[1:])


def load_molecules(config):
    """RDKit's shipped molecules (at most --max_atoms atoms), their property tasks (RDKit,
    cached under <output_dir>/cache), the tasks that can fill the largest episode, and the
    meta-training / meta-test task split."""
    smiles = [s for s in embedded.pretraining_smiles(config.num_molecules)]
    graphs = [smiles_to_graph(s) for s in smiles]
    kept = [i for i, g in enumerate(graphs) if len(g["node_features"]) <= config.max_atoms]
    smiles, graphs = [smiles[i] for i in kept], [graphs[i] for i in kept]
    labels, names = embedded.pretraining_tasks(
        smiles, config.task_families, min_rate=0.0,
        cache=os.path.join(config.output_dir, "cache", "molecule_task_labels.npz"))
    largest = max(config.k_shot + config.n_query,
                  max(config.test_shots) + config.test_n_query)
    counts = np.minimum(labels.sum(0), len(labels) - labels.sum(0))
    usable = np.flatnonzero(counts >= largest)
    if len(usable) <= config.num_test_tasks:
        raise app.UsageError(
            f"--num_test_tasks={config.num_test_tasks}: only {len(usable)} of the {len(names)} "
            f"tasks of {len(smiles)} molecules have {largest} positives and negatives (the "
            f"largest episode); raise --num_molecules or lower the shots")
    train_tasks, test_tasks = tasks.split_classes(usable, config.num_test_tasks,
                                                  config.split_seed)
    runner.log(f"molecules: {len(smiles)} of {config.num_molecules} with <= "
               f"{config.max_atoms} atoms; {len(usable)} of {len(names)} tasks usable, "
               f"{len(train_tasks)} for meta-training, {len(test_tasks)} for meta-testing")
    train = tasks.PropertyTaskSampler(labels, train_tasks, k_shot=config.k_shot,
                                      n_query=config.n_query, name="meta-training tasks")
    test = {k: tasks.PropertyTaskSampler(labels, test_tasks, k_shot=k,
                                         n_query=config.test_n_query,
                                         name=f"meta-test tasks ({k}-shot)")
            for k in config.test_shots}
    return MoleculeFamily(train, test, train_tasks, test_tasks, graphs=graphs, labels=labels,
                          task_names=list(names), max_nodes=config.max_atoms,
                          max_edges=max(len(g["edge_index"]) for g in graphs))


def rotated_classes(x, y, rotations):
    """Every image rotated by i * 360 / rotations degrees (i = 0 .. rotations - 1) as class
    label + 10 i (square images)."""
    quarter_turns = 4 // rotations
    xs = [np.rot90(x, i * quarter_turns, axes=(1, 2)) for i in range(rotations)]
    return (np.ascontiguousarray(np.concatenate(xs)),
            np.concatenate([y + 10 * i for i in range(rotations)]).astype(np.int32))


def support_batches(family, examples, labels, config, steps, key):
    """The support set as the inner loop consumes it: the whole set (every step), or with
    --inner_batch one minibatch per step (rows drawn without replacement per step by the
    NumPy generator seeded with ``key``). Leading task dimension kept."""
    if config.inner_batch <= 0 or config.inner_batch >= examples.shape[1]:
        return (family.inputs(examples), tf.constant(labels))
    rng = np.random.default_rng([MINIBATCH_TAG, *key])
    rows = np.stack([[rng.choice(examples.shape[1], config.inner_batch, replace=False)
                      for _ in range(steps)] for _ in range(examples.shape[0])])  # [M, T, b]
    take = np.arange(examples.shape[0])[:, None, None]
    return StepBatches((family.inputs(examples[take, rows]), tf.constant(labels[take, rows])))


def meta_batch(family, config, seed, step, query_in_support=False):
    """The training episodes of a meta-step: (support, support labels, query, query labels,
    the support's original labels); with ``query_in_support`` each task's query examples
    join its support set (after its own examples)."""
    episodes = [family.train.episode(seed, step * config.meta_batch + m, TRAIN_STREAM)
                for m in range(config.meta_batch)]
    support, support_labels, query, query_labels = tasks.stack_episodes(episodes)
    original = np.stack([family.original_labels(e, "support") for e in episodes])
    if query_in_support:
        support = np.concatenate([support, query], 1)
        support_labels = np.concatenate([support_labels, query_labels], 1)
        original = np.concatenate([original, np.stack([family.original_labels(e, "query")
                                                       for e in episodes])], 1)
    return support, support_labels, query, query_labels, original


# ----------------------------------------------------------------------------- one arm

def metric_of(config):
    """(record key prefix, name, plural) of the test metric: query accuracy, or AUROC
    (molecules)."""
    if config.family == "molecules":
        return "test_auroc", "auroc", "aurocs"
    return "test_accuracy", "accuracy", "accuracies"


class TaskModel:
    """The family's learner as pure functions: params' first value, the loss, the warped
    learner (WarpGrad) and the test score of a query set (accuracy, or AUROC for
    molecules)."""

    def __init__(self, config, family, seed, warped=False):
        self.family = family
        family.build_model(self, config, seed, warped)

    def score(self, params, warp_params, episode):
        """The adapted ``params``' accuracy (AUROC) on the query set of ``episode``."""
        query = tf.nest.map_structure(lambda x: x[0], self.family.inputs(episode.query[None]))
        return self.family.query_score(self, params, warp_params, query, episode.query_labels)


def make_learner(arm, seed, config, family):
    """(the arm's learner, its `TaskModel`)."""
    model = TaskModel(config, family, seed, warped=arm == "warpgrad")
    return build_learner(arm, model, config, seed), model


def build_learner(arm, model, config, seed):
    params, loss = model.params, model.loss
    common = dict(inner_steps=config.inner_steps, inner_learning_rate=config.inner_lr)
    if arm == "scratch":
        return taskmeta.FromScratch(loss, params, **common)
    if arm == "pretrain_finetune":
        optimizer = keras.optimizers.Adam(config.meta_lr)
        return taskmeta.MultitaskPretraining(params, model.pretraining_outputs,
                                             optimizer=optimizer, loss_fn=loss, **common)
    if arm in ("maml", "fomaml"):
        return taskmeta.MAML(loss, params, meta_optimizer=keras.optimizers.Adam(config.meta_lr),
                             first_order=arm == "fomaml", **common)
    if arm == "reptile":
        return taskmeta.Reptile(loss, params, meta_step_size=config.meta_step_size, **common)
    if arm == "warpgrad":
        return taskmeta.WarpGrad(
            model.warped_loss, params, model.warp_params,
            warp_learning_rate=config.warp_lr, init_learning_rate=config.warpgrad_init_lr,
            trajectory_points=config.warpgrad_points or None,
            warp_batch=config.warpgrad_batch or None, seed=seed,
            init_update=config.warpgrad_init,
            meta_optimizer=(keras.optimizers.Adam(config.meta_lr)
                            if config.warpgrad_init == "first_order_maml" else None), **common)
    if arm == "cts":
        return taskmeta.ContinualTrajectoryShifting(
            loss, params, meta_step_size=config.cts_meta_step_size,
            update_every=config.cts_update_every, **common)
    return taskmeta.ARUBA(loss, params, meta_step_size=config.meta_step_size,
                          zeta=config.aruba_zeta, power=config.aruba_power, **common)


def test_scores(learner, model, family, config):
    """{k_shot: [query accuracy (molecules: AUROC) of each test task]}."""
    out = {}
    warps = learner.warp_values() if isinstance(learner, taskmeta.WarpGrad) else None
    for k, sampler in family.test.items():
        values = []
        for i in range(config.test_episodes):
            e = sampler.episode(config.test_seed, i, TEST_STREAM)
            support = support_batches(family, e.support[None], e.support_labels[None],
                                      config, config.test_inner_steps,
                                      (config.test_seed, k, i))
            support = (StepBatches(tf.nest.map_structure(lambda x: x[0], support.batches))
                       if isinstance(support, StepBatches)
                       else tf.nest.map_structure(lambda x: x[0], support))
            params = learner.adapt(support, config.test_inner_steps)
            values.append(model.score(params, warps, e))
        out[k] = values
    return out


def run_arm(config, family, arm, seed):
    """Meta-trains one arm for its meta-steps (`Config.meta_steps_of`), resuming from its
    last checkpoint, then tests it on the held-out classes."""
    meta_steps = config.meta_steps_of(arm)
    learner, model = make_learner(arm, seed, config, family)
    if config.zero_head and arm not in ("scratch", "pretrain_finetune"):
        learner.keep_at_initial_value([-2, -1])  # the head: [W, b], zero at first
    history, save = runner.resume_run(
        runner.run_directory(config, arm, seed), learner.checkpoint_items(),
        {"step": [], "seconds_per_step": [], "metrics": []}, learner.meta_steps.numpy,
        key="step", unit="meta-step")
    progbar = keras.utils.Progbar(meta_steps, verbose=config.verbose == 1)
    history.setdefault("tracing_seconds", [])  # the first meta-step of each process
    traced = False
    while int(learner.meta_steps.numpy()) < meta_steps:
        first = int(learner.meta_steps.numpy())
        last = min(first + config.checkpoint_every, meta_steps)
        start, chunk, timed_from = time.perf_counter(), [], first
        for step in range(first, last):
            support, support_labels, query, query_labels, original = meta_batch(
                family, config, seed, step, config.query_in_support and arm in SUPPORT_ONLY)
            if arm == "pretrain_finetune":
                metrics = learner.meta_step(family.pretraining_batch(support, original))
            else:
                metrics = learner.meta_step(
                    support_batches(family, support, support_labels, config,
                                    config.inner_steps, (seed, step)),
                    (family.inputs(query), tf.constant(query_labels)))
            chunk.append(metrics)
            if not traced:  # it traced the step functions: timed apart from the chunk
                traced = True
                history["tracing_seconds"].append(time.perf_counter() - start)
                if last - first > 1:
                    start, timed_from = time.perf_counter(), step + 1
            progbar.update(step + 1, list(metrics.items()))
        history["step"].append(last)
        # seconds per step of the chunk, without a first step that traced (a chunk of that
        # one step alone keeps it)
        history["seconds_per_step"].append((time.perf_counter() - start) / (last - timed_from))
        history["metrics"].append({k: float(np.mean([m[k] for m in chunk])) for k in chunk[0]})
        if config.verbose == 2:
            runner.log(f"  meta-step {last}/{meta_steps}: {history['metrics'][-1]}")
        save(history)
    scores = test_scores(learner, model, family, config)
    previous = [0] + history["step"][:-1]
    record = {"history": history, "meta_steps": meta_steps,
              # wall-clock of meta-training at the chunks' steady rates (checkpointing and
              # each process's tracing step apart: the latter in tracing_seconds)
              "meta_training_seconds": float(sum(
                  (last - first) * seconds for first, last, seconds in
                  zip(previous, history["step"], history["seconds_per_step"]))),
              "tracing_seconds": float(sum(history["tracing_seconds"])),
              # the first chunk may still hold warm-up after tracing: the later ones
              "seconds_per_meta_step": float(np.median(history["seconds_per_step"][1:]
                                                       or history["seconds_per_step"]))}
    metric, name, plural = metric_of(config)
    for k, values in scores.items():
        mean, half = runner.mean_and_interval(values)
        record[f"{metric}_{k}shot"] = mean
        record[f"test_ci95_{k}shot"] = half
        record[f"test_task_{plural}_{k}shot"] = values
    if arm == "aruba":
        eta = np.concatenate([e.numpy().ravel() for e in learner.eta])
        record["aruba_step_size_quantiles"] = np.quantile(eta, [0.05, 0.5, 0.95]).tolist()
    runner.log(f"  meta-test {name}: " + ", ".join(
        f"{k}-shot {record[f'{metric}_{k}shot']:.4f} +- {record[f'test_ci95_{k}shot']:.4f}"
        for k in config.test_shots))
    return record


# ----------------------------------------------------------------------------- report

def method_table(records, config):
    """Per arm: the mean over seeds of a seed's 95% interval over its test tasks and the
    seconds per meta-step."""
    shots = config.test_shots
    lines = ["", "| arm | " + " | ".join(f"{k}-shot 95% interval over tasks (mean over seeds)"
                                         for k in shots) + " | s / meta-step |",
             "|---" + "|---:" * (len(shots) + 1) + "|"]
    for arm in ARMS:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if rows:
            cells = [f"+-{np.mean([r[f'test_ci95_{k}shot'] for r in rows]):.4f}" for k in shots]
            cells.append(f"{np.mean([r['seconds_per_meta_step'] for r in rows]):.4f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric, name, _ = metric_of(config)
    fig, ax = plt.subplots(figsize=(8, 4))
    arms = [a for a in ARMS if any(arm == a for arm, _ in records)]
    width = 0.8 / len(config.test_shots)
    for j, k in enumerate(config.test_shots):
        values = [[r[f"{metric}_{k}shot"] for (a, _), r in records.items() if a == arm]
                  for arm in arms]
        ax.bar(np.arange(len(arms)) + j * width, [np.mean(v) for v in values], width,
               yerr=[np.std(v) for v in values], capsize=3, label=f"{k}-shot")
    ax.set_xticks(np.arange(len(arms)) + width * (len(config.test_shots) - 1) / 2, arms,
                  rotation=20)
    if config.family == "molecules":
        ax.set_ylim(0.5, 1.0)  # AUROC: 0.5 is chance
    ax.set(ylabel=f"meta-test {name}",
           title=f"{config.family}: {config.n_way}-way, held-out "
                 f"{'tasks' if config.family == 'molecules' else 'classes'}, mean +- std over "
                 "seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config, _ = runner.setup(Config)
    family = load_family(config)
    runner.log(family.describe(config))
    records = runner.run_grid(config, lambda arm, seed, _: run_arm(config, family, arm, seed))
    modes = tuple(f"{k}shot" for k in config.test_shots)
    table, _ = runner.summarise(
        records, config, modes, metric=metric_of(config)[0], rate_column=False,
        labels={f"{k}shot": f"{config.n_way}-way {k}-shot meta-test {metric_of(config)[1]}"
                for k in config.test_shots}, appendix=method_table(records, config))
    print("\n" + table)
    if config.plot:
        plot(records, config, os.path.join(config.output_dir, "task_meta_learning.png"))


if __name__ == "__main__":
    app.run(main)
