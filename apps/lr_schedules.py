r"""Learn learning-rate, momentum and weight-decay schedules over a long horizon (Fashion-MNIST).

Each schedule holds one value per block of contiguous inner steps (--blocks), as Micaelli &
Storkey (2021) share them. One outer step trains an MLP 784-hidden-10 (ReLU) from a fresh
initialisation for --inner_steps steps of SGD with averaged momentum (v <- gamma v - (1 - gamma)
g, w <- w + lr v; the L2 penalty wd/2 ||kernels||^2 in the loss), takes the hypergradient of the
loss on the whole validation split at the end, and moves every schedule by the outer step of
that paper (`hyper.clipped_schedule_step`: hypergradients clipped so that one step moves a
value by at most max(threshold, 10%), SGD with momentum 0.1, values clamped into their ranges).

Arms (--arms), all from the same initial schedule (--init_*) except hand_tuned:
- hand_tuned: constant --hand_lr, --hand_momentum, --hand_wd (chosen by hand on the validation
  split of seed 0; the README lists the values tried);
- greedy: one training run in which every --greedy_every steps the one-step look-ahead
  hypergradient (validation minibatch of --greedy_val_batch) moves a single lr, momentum and
  wd (the same clipped rule): online and short-horizon;
- hyperdistill: the greedy run with `km.HyperDistill` in place of the one-step look-ahead: the
  online hypergradient over the whole run so far (damped by --hyperdistill_gamma), distilled
  into one step VJP at an interpolated point, its scale fitted to DrMAD-style references every
  --hyperdistill_every steps; the steps between hyper-updates are counted by its `advance`;
- forward: the hypergradient through the whole horizon by `km.Forward` (tangents carried
  forward: memory constant in the horizon, one JVP per hyperparameter and step);
- reversible: the same hypergradient by `km.Reversible` (the run undone exactly: memory O(P)
  plus a few bits per weight and step; about 4 gradients per step, whatever the number of
  hyperparameters).
Every arm is then judged the same way: a final training run with its schedule (greedy: the
hyperparameters it ended with at each step, as it ran them) from the seed's evaluation
initialisation and batch order (the same for every arm of a seed), and its accuracy on the
Fashion-MNIST test set (never seen before). The validation split comes out of the training
file (--num_val examples, fixed by --split_seed).

    python apps/lr_schedules.py                            # CPU default: 5 seeds
    python apps/lr_schedules.py --arms=hand_tuned,forward --inner_steps=500 --seeds=0
    python apps/lr_schedules.py --full                     # ~10^4 steps per run, for a GPU

Writes <output_dir>/summary.md (test accuracy per arm, paired differences to --baseline with
95% t intervals, validation accuracy, seconds), summary.json, results/<arm>_seed<k>.json and
lr_schedules.png (the learned schedules; validation accuracy against outer step). An (arm,
seed) saves its state after every outer step under <output_dir>/<arm>_seed<k> and resumes
there; finished arms are reused (runner.run_grid). A seed fixes a run: bit-identical on CPU.
"""

import dataclasses
import json
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
from keras_metapt import optim  # noqa: E402
from keras_metapt.data import images as image_data  # noqa: E402
from keras_metapt.hyper import clipped_schedule_step, piecewise_constant  # noqa: E402

FLAGS = flags.FLAGS
ARMS = ("hand_tuned", "greedy", "hyperdistill", "forward", "reversible")
SCHEDULES = ("lr", "momentum", "wd")
EVAL_STREAM, OUTER_STREAM, GREEDY_STREAM = 0, 1, 2

flags.DEFINE_string("images_dir", image_data.FASHION_MNIST_DIR, "Folder of MNIST-layout IDX "
                    "files (Fashion-MNIST); default Debian's dataset-fashion-mnist package.")
flags.DEFINE_list("arms", ["hand_tuned", "greedy", "reversible"],
                  "Arms to run, out of " + ", ".join(ARMS) + " (forward costs one JVP per "
                  "hyperparameter and step: about 4x reversible's time at 15 hyperparameters).")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (initialisations and batch "
                  "orders); every arm of a seed sees the same.")
flags.DEFINE_enum("baseline", "hand_tuned", list(ARMS), "Arm the summary compares every other "
                  "arm with, paired by seed.")
flags.DEFINE_integer("num_val", 5000, "Validation examples, taken out of the training file.")
flags.DEFINE_integer("num_train", 50000, "Training examples (after the validation split; at "
                     "most what the file holds minus --num_val).")
flags.DEFINE_integer("split_seed", 0, "Seed of the train/validation split (the same for all "
                     "seeds).")
flags.DEFINE_integer("hidden", 64, "Hidden units of the MLP 784-hidden-10.")
flags.DEFINE_integer("batch_size", 128, "Examples per inner step.")
flags.DEFINE_integer("inner_steps", 2000, "Inner steps T of every training run (the horizon).")
flags.DEFINE_integer("blocks", 5, "Values per schedule (each shared by T / blocks steps).")
flags.DEFINE_integer("outer_steps", 30, "Outer steps (full training runs) of forward and "
                     "reversible.")
flags.DEFINE_float("init_lr", 0.05, "Initial learning rate of every learned schedule.")
flags.DEFINE_float("init_momentum", 0.5, "Initial momentum gamma of every learned schedule.")
flags.DEFINE_float("init_wd", 0.0, "Initial weight decay of every learned schedule.")
flags.DEFINE_float("hand_lr", 0.3, "hand_tuned: learning rate.")
flags.DEFINE_float("hand_momentum", 0.9, "hand_tuned: momentum gamma.")
flags.DEFINE_float("hand_wd", 0.0, "hand_tuned: weight decay.")
flags.DEFINE_float("outer_lr", 0.1, "Learning rate of the outer SGD on the schedules.")
flags.DEFINE_float("outer_momentum", 0.1, "Momentum of the outer SGD on the schedules.")
flags.DEFINE_list("clip_thresholds", ["0.05", "0.05", "1e-4"], "Per schedule (lr, momentum, "
                  "wd): the least one outer step may move a value (the most is max(this, "
                  "--clip_relative * value)).")
flags.DEFINE_float("clip_relative", 0.1, "Relative bound of one outer step.")
flags.DEFINE_list("lr_range", ["0", "2"], "Learning rates are clamped into this range.")
flags.DEFINE_list("momentum_range", ["0.01", "0.99"], "Momenta are clamped into this range "
                  "(> 0: reversal divides by gamma).")
flags.DEFINE_list("wd_range", ["0", "0.005"], "Weight decays are clamped into this range.")
flags.DEFINE_integer("greedy_every", 20, "greedy and hyperdistill: inner steps between "
                     "hyper-updates.")
flags.DEFINE_integer("greedy_val_batch", 500, "greedy and hyperdistill: validation examples per "
                     "hypergradient.")
# gamma 0.9: picked on the validation split of seed 0 from 0.9, 0.99 and 0.999 (README)
runner.define_hyperdistill_flags("hyperdistill", every_default=100, gamma_default=0.9)
flags.DEFINE_enum("hyperdistill_scale_fit", "least_squares", ["least_squares", "median"],
                  "hyperdistill: how the scale theta is fitted to the references: least squares "
                  "over all of them, or the median of the last 64 per-reference fits (robust "
                  "to one reference that blows up).")
flags.DEFINE_bool("full", False, "The GPU-size run: --inner_steps=10000, --hidden=256 and "
                  "--outer_steps=50 in place of their values (about 10^4 steps, as the FDS "
                  "paper's runs).")
flags.DEFINE_bool("float64", True, "Train in float64 (in float32 the long-horizon "
                  "hypergradient of this ReLU network changes with rounding: two float32 "
                  "estimators of it disagreed by ~10x more than in float64).")
flags.DEFINE_string("output_dir", "runs/lr_schedules", "Results, plot and resumable state.")
flags.DEFINE_bool("resume", True, "Reuse finished (arm, seed) results and resume unfinished "
                  "ones from their last outer step, when made with the same settings.")
flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar per arm; 2: a line per outer "
                     "step.")
flags.DEFINE_bool("plot", True, "Write lr_schedules.png.")
runner.define_strategy_flags("training (only the default, one device: the estimators of "
                             "this app run on one replica)")
flags.adopt_module_key_flags(runner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(runner.GridConfig):
    """The flags of this app (see --helpshort)."""

    images_dir: str
    num_val: int
    num_train: int
    split_seed: int
    hidden: int
    batch_size: int
    inner_steps: int
    blocks: int
    outer_steps: int
    init_lr: float
    init_momentum: float
    init_wd: float
    hand_lr: float
    hand_momentum: float
    hand_wd: float
    outer_lr: float
    outer_momentum: float
    clip_thresholds: tuple
    clip_relative: float
    lr_range: tuple
    momentum_range: tuple
    wd_range: tuple
    greedy_every: int
    greedy_val_batch: int
    hyperdistill_gamma: float
    hyperdistill_every: int
    hyperdistill_reference_steps: int
    hyperdistill_anchor_every: int
    hyperdistill_scale_fit: str
    full: bool
    float64: bool
    verbose: int
    plot: bool

    ARMS = ARMS
    DATA_PATHS = ("images_dir",)
    NOT_IN_RESULTS = runner.GridConfig.NOT_IN_RESULTS + ("verbose", "plot")
    BOUNDS = {"num_val": "[10, inf)", "num_train": "[10, inf)", "split_seed": "[0, inf)",
              "hidden": "[1, inf)", "batch_size": "[1, inf)", "inner_steps": "[1, inf)",
              "blocks": "[1, inf)", "outer_steps": "[0, inf)", "init_lr": "[0, inf)",
              "init_momentum": "(0, 1]", "init_wd": "[0, inf)", "hand_lr": "[0, inf)",
              "hand_momentum": "(0, 1]", "hand_wd": "[0, inf)", "outer_lr": "(0, inf)",
              "outer_momentum": "[0, 1)", "clip_relative": "[0, inf)",
              "greedy_every": "[1, inf)", "greedy_val_batch": "[1, inf)",
              **runner.HYPERDISTILL_BOUNDS, "verbose": "[0, 2]"}

    def __post_init__(self):
        if self.full:  # the GPU-size run
            object.__setattr__(self, "inner_steps", 10_000)
            object.__setattr__(self, "hidden", 256)
            object.__setattr__(self, "outer_steps", 50)
        super().__post_init__()
        if self.strategy != "default":
            raise app.UsageError(f"--strategy={self.strategy}: this app runs on one device "
                                 "(Forward and Reversible are one-replica estimators)")
        if self.blocks > self.inner_steps:
            raise app.UsageError(f"--blocks={self.blocks} exceeds --inner_steps="
                                 f"{self.inner_steps}: every block needs a step")
        for name in ("clip_thresholds", "lr_range", "momentum_range", "wd_range"):
            try:
                values = tuple(float(v) for v in getattr(self, name))
            except ValueError:
                raise app.UsageError(f"--{name}={','.join(getattr(self, name))}: numbers"
                                     ) from None
            wanted = 3 if name == "clip_thresholds" else 2
            if len(values) != wanted or min(values) < 0 or (
                    wanted == 2 and values[0] > values[1]):
                raise app.UsageError(f"--{name}={','.join(map(str, values))}: {wanted} numbers"
                                     + (" >= 0" if wanted == 3 else ", low <= high, >= 0"))
            object.__setattr__(self, name, values)
        if self.momentum_range[0] <= 0 or self.momentum_range[1] > 1:
            raise app.UsageError("--momentum_range: must lie in (0, 1] (reversal divides by "
                                 "the momentum)")

    @property
    def dtype(self):
        return tf.float64 if self.float64 else tf.float32

    def ranges(self):
        return dict(zip(SCHEDULES, (self.lr_range, self.momentum_range, self.wd_range)))


# ----------------------------------------------------------------------------- data, model

@dataclasses.dataclass(frozen=True)
class Data:
    x_train: tf.Tensor
    y_train: tf.Tensor
    x_val: tf.Tensor
    y_val: tf.Tensor
    x_test: tf.Tensor
    y_test: tf.Tensor


def load_data(config):
    (x, y), (x_test, y_test) = image_data.load_idx_dataset(config.images_dir)
    if config.num_val + config.num_train > len(x):
        raise app.UsageError(f"--num_val={config.num_val} + --num_train={config.num_train} "
                             f"exceed the {len(x)} training examples in {config.images_dir}")
    order = np.random.default_rng(config.split_seed).permutation(len(x))
    val, train = order[:config.num_val], order[config.num_val:config.num_val + config.num_train]
    dtype = config.dtype.as_numpy_dtype

    def flat(images):
        return tf.constant(images.reshape(len(images), -1).astype(dtype))

    return Data(flat(x[train]), tf.constant(y[train], tf.int32), flat(x[val]),
                tf.constant(y[val], tf.int32), flat(x_test), tf.constant(y_test, tf.int32))


def build_model(config):
    dtype = config.dtype.name
    layers = [keras.Input((784,), dtype=dtype),
              keras.layers.Dense(config.hidden, activation="relu", dtype=dtype),
              keras.layers.Dense(10, dtype=dtype)]
    return keras.Sequential(layers, name="fashion_mlp")


def initial_params(model, dtype, seed):
    """Fresh weights of ``model`` for (seed, stream, index): Glorot-uniform kernels, zero
    biases (Keras' Dense defaults), drawn with explicit seeds."""
    params = []
    for k, variable in enumerate(model.trainable_variables):
        if len(variable.shape) == 2:
            init = keras.initializers.GlorotUniform(seed=int(seed) * 10 + k)
            params.append(tf.cast(init(variable.shape), dtype))
        else:
            params.append(tf.zeros(variable.shape, dtype))
    return params


def batch_order(config, seed, stream, index, steps=None):
    """[T, batch] example indices of one training run (sampled with replacement), and each
    step's position on the horizon T, as `StepBatches`. A shorter run (``steps`` < T, the
    low-fidelity runs of benchmarks.long_horizon) takes the first ``steps`` rows and puts its
    step t at t T / steps, so that its schedules are the horizon's, compressed."""
    T = config.inner_steps
    steps = T if steps is None else int(steps)
    rng = np.random.default_rng([seed, stream, index])
    order = rng.integers(0, int(config.num_train), size=(T, config.batch_size))[:steps]
    position = tf.range(steps) * T // steps
    return km.StepBatches((tf.constant(order, tf.int32), position))


def make_problem(model, data, config):
    """Inner loss at step t: cross-entropy + wd(t)/2 ||kernels||^2; outer: validation
    cross-entropy (whole split). Schedules: piecewise constant over --blocks."""
    _, non_trainable = km.functional.model_state(model)

    def logits(params, x):
        return km.functional.stateless_apply(model, params, non_trainable, x)[0]

    def cross_entropy(params, x, y):
        out = logits(params, x)
        return -tf.reduce_mean(tf.reduce_sum(tf.one_hot(y, 10, dtype=out.dtype)
                                             * tf.nn.log_softmax(out), -1))

    def inner(params, h, batch):
        index, step = batch
        wd = piecewise_constant(h["wd"], step, config.inner_steps)
        penalty = tf.add_n([tf.reduce_sum(p ** 2) for p in params if p.shape.rank == 2])
        return (cross_entropy(params, tf.gather(data.x_train, index),
                              tf.gather(data.y_train, index)) + 0.5 * wd * penalty)

    def outer(params, h, batch):
        x, y = batch
        return cross_entropy(params, x, y)

    def rates(h, step, num_steps):
        return {"learning_rate": piecewise_constant(h["lr"], step, num_steps),
                "momentum": piecewise_constant(h["momentum"], step, num_steps)}

    def accuracy(params, x, y):
        return float(tf.reduce_mean(tf.cast(tf.equal(
            tf.argmax(logits(params, x), -1, output_type=tf.int32), y), tf.float32)))

    return km.BilevelProblem(inner, outer, inner_optimizer_hparams=rates), accuracy


def constant_schedule(config, lr, momentum, wd, blocks=None):
    blocks = blocks or config.blocks
    return {name: tf.fill([blocks], tf.constant(value, config.dtype))
            for name, value in zip(SCHEDULES, (lr, momentum, wd))}


def outer_update(config, values, hypergrad, velocity):
    """`clipped_schedule_step` on every schedule (its own threshold and range)."""
    new_values, new_velocity = {}, {}
    for name, threshold in zip(SCHEDULES, config.clip_thresholds):
        low, high = config.ranges()[name]
        new_values[name], new_velocity[name] = clipped_schedule_step(
            values[name], hypergrad[name], velocity[name], learning_rate=config.outer_lr,
            momentum=config.outer_momentum, threshold=threshold,
            relative=config.clip_relative, low=low, high=high)
    return new_values, new_velocity


# ----------------------------------------------------------------------------- the arms

class Experiment:
    """What the arms of every seed share: data, model, problem and the compiled runs."""

    def __init__(self, config, data):
        self.config, self.data = config, data
        self.model = build_model(config)
        self.problem, self.accuracy = make_problem(self.model, data, config)
        self.optimizer = optim.ema_momentum_sgd(0.1, 0.5)
        T = config.inner_steps
        self.estimators = {"forward": km.Forward(self.optimizer, T, max_hparams=10_000),
                           "reversible": km.Reversible(T)}
        val = (data.x_val, data.y_val)
        self._hypergradient = {
            arm: tf.function(lambda p, h, b, est=est: est(self.problem, p, h,
                                                          km.StepBatches(b), val))
            for arm, est in self.estimators.items()}
        self._train = tf.function(lambda p, h, b, s, steps: km.hypergrad.train_inner(
            self.problem, self.optimizer, p, h, km.StepBatches(b), steps, opt_state=s))
        self._one_step = km.Unrolled(self.optimizer, 1)
        self._look_ahead = tf.function(lambda p, h, b, s, v: self._one_step(
            self.problem, p, h, b, v, opt_state=s))
        self.distiller = km.HyperDistill(
            self.optimizer, config.hyperdistill_gamma, distill_every=config.hyperdistill_every,
            reference_steps=config.hyperdistill_reference_steps,
            anchor_every=config.hyperdistill_anchor_every or None,
            scale_fit=config.hyperdistill_scale_fit)
        self._distilled = tf.function(lambda p, h, b, s, v: self.distiller(
            self.problem, p, h, b, v, opt_state=s))

    def outer_step(self, arm, schedule, velocity, seed, stream, index):
        """One outer step of ``arm`` (forward or reversible): a full run from the fresh start
        (seed, stream, index), its hypergradient, the clipped update. Returns (result, new
        schedule, new velocity)."""
        result = km.ensure_finite(self._hypergradient[arm](
            self.init(seed, stream, index), schedule,
            batch_order(self.config, seed, stream, index).batches))
        new, velocity = outer_update(self.config, schedule, result.hypergrad, velocity)
        return result, new, velocity

    def init(self, seed, stream, index):
        return initial_params(self.model, self.config.dtype,
                              100_000 * seed + 10_000 * stream + index)

    def train(self, params, schedule, order, velocity=None):
        """The steps of ``order`` (StepBatches) with ``schedule``; (params, velocity)."""
        if velocity is None:
            velocity = self.optimizer.init(params)
        # the number of steps is a Python int: each distinct length traces once
        return self._train(params, schedule, order.batches, velocity, order.length())

    def evaluate(self, schedule_or_params, seed, trained=False):
        """Final run from the seed's evaluation start with a schedule; test/val accuracy."""
        if trained:
            params = schedule_or_params
        else:
            params, _ = self.train(self.init(seed, EVAL_STREAM, 0), schedule_or_params,
                                   batch_order(self.config, seed, EVAL_STREAM, 0))
        d = self.data
        return {"test_accuracy_final": self.accuracy(params, d.x_test, d.y_test),
                "val_accuracy_final": self.accuracy(params, d.x_val, d.y_val),
                "test_loss": float(self.problem.outer_loss(params, None, (d.x_test, d.y_test)))}


def listed(schedule):
    """A schedule (or velocity) as JSON lists."""
    return {k: [float(x) for x in v.numpy()] for k, v in schedule.items()}


def as_tensors(config, lists):
    """JSON lists back to the run's tensors."""
    return {k: tf.constant(v, config.dtype) for k, v in lists.items()}


def run_hand_tuned(exp, seed):
    config = exp.config
    schedule = constant_schedule(config, config.hand_lr, config.hand_momentum, config.hand_wd)
    start = time.perf_counter()
    out = exp.evaluate(schedule, seed)
    return {**out, "schedule": listed(schedule), "history": [],
            "seconds": time.perf_counter() - start, "seconds_per_hypergradient": None}


def run_outer_loop(exp, arm, seed):
    """forward / reversible: --outer_steps full runs, a hypergradient each, state saved after
    every step (resumes from it)."""
    config = exp.config
    state_path = os.path.join(runner.run_directory(config, arm, seed), "state.json")
    state = {"step": 0, "schedule": listed(constant_schedule(
        config, config.init_lr, config.init_momentum, config.init_wd)),
        "velocity": {k: [0.0] * config.blocks for k in SCHEDULES}, "history": [],
        "seconds": 0.0}
    if config.resume and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        runner.log(f"seed {seed} {arm}: resumed at outer step {state['step']}")
    progbar = (keras.utils.Progbar(config.outer_steps, unit_name="outer step")
               if config.verbose == 1 else None)
    while state["step"] < config.outer_steps:
        k = state["step"]
        start = time.perf_counter()
        result, new, velocity = exp.outer_step(
            arm, as_tensors(config, state["schedule"]), as_tensors(config, state["velocity"]),
            seed, OUTER_STREAM, k)
        seconds = time.perf_counter() - start
        d = exp.data
        state["history"].append({
            "outer_step": k + 1, "val_loss": float(result.outer_loss),
            "val_accuracy": exp.accuracy(result.params, d.x_val, d.y_val),
            "schedule": state["schedule"], "velocity": state["velocity"],
            "hypergrad": listed(result.hypergrad),
            "seconds": seconds})
        state.update(step=k + 1, schedule=listed(new), velocity=listed(velocity),
                     seconds=state["seconds"] + seconds)
        runner.write_json(state_path, state)
        if progbar is not None:
            progbar.update(k + 1, [("val_acc", state["history"][-1]["val_accuracy"])])
        elif config.verbose == 2:
            h = state["history"][-1]
            runner.log(f"  {arm} seed {seed} outer step {k + 1}: val loss {h['val_loss']:.4f}, "
                       f"val acc {h['val_accuracy']:.4f}, {seconds:.1f} s")
    out = exp.evaluate(as_tensors(config, state["schedule"]), seed)
    per = [h["seconds"] for h in state["history"]]
    return {**out, "schedule": state["schedule"], "history": state["history"],
            "seconds": state["seconds"],
            "seconds_per_hypergradient": float(np.median(per)) if per else None}


def run_online(exp, arm, seed):
    """One online run from the evaluation start: every --greedy_every steps a hypergradient on
    a validation minibatch moves (lr, momentum, wd). greedy: the one-step look-ahead;
    hyperdistill: `km.HyperDistill` (started at the run's first weights; the steps between
    two hyper-updates are counted by its advance), taken at the same step from the same
    weights as greedy's look-ahead."""
    config, d = exp.config, exp.data
    start_time = time.perf_counter()
    params = exp.init(seed, EVAL_STREAM, 0)
    order = batch_order(config, seed, EVAL_STREAM, 0)
    velocity = exp.optimizer.init(params)
    if arm == "hyperdistill":
        hypergradient = exp._distilled
        exp.distiller.start(params)
    else:
        hypergradient = exp._look_ahead
    values = constant_schedule(config, config.init_lr, config.init_momentum, config.init_wd, 1)
    outer_velocity = {k: tf.zeros([1], config.dtype) for k in SCHEDULES}
    rng = np.random.default_rng([seed, GREEDY_STREAM])
    history = []
    for t in range(0, config.inner_steps, config.greedy_every):
        val_index = rng.integers(0, config.num_val, config.greedy_val_batch)
        val = (tf.gather(d.x_val, val_index), tf.gather(d.y_val, val_index))
        step_batch = (order.batches[0][t], tf.constant(t))
        result = km.ensure_finite(hypergradient(params, values, step_batch, velocity, val))
        if arm == "hyperdistill":  # its call took step t + 1; training takes the chunk below
            exp.distiller.advance(config.greedy_every - 1)
        history.append({"step": t, "schedule": listed(values),
                        "hypergrad": listed(result.hypergrad)})
        values, outer_velocity = outer_update(config, values, result.hypergrad, outer_velocity)
        # the next steps of the order (one block: the values hold at every step)
        chunk = km.StepBatches(tf.nest.map_structure(
            lambda x: x[t:t + config.greedy_every], order.batches))
        params, velocity = exp.train(params, values, chunk, velocity)
    out = exp.evaluate(params, seed, trained=True)
    extra = {}
    if arm == "hyperdistill":
        extra = {"hyperdistill_scale": float(exp.distiller.scale),
                 "hyperdistill_references": int(exp.distiller.state.references.numpy()),
                 "hyperdistill_steps": int(exp.distiller.state.step.numpy())}
    return {**out, "schedule": listed(values), "history": history,
            "seconds": time.perf_counter() - start_time,
            "seconds_per_hypergradient": None, **extra}


def run_arm(exp, arm, seed):
    if arm == "hand_tuned":
        return run_hand_tuned(exp, seed)
    if arm in ("greedy", "hyperdistill"):
        return run_online(exp, arm, seed)
    return run_outer_loop(exp, arm, seed)


# ----------------------------------------------------------------------------- report

def details_table(records, config):
    lines = ["", "| arm | validation accuracy (final run) | test loss | final schedule "
             "(seed " + str(config.seeds[0]) + ": lr / momentum / wd per block) | seconds per "
             "arm | seconds per hypergradient |", "|---|---:|---:|---|---:|---:|"]
    for arm in config.arms:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm]
        if not rows:
            continue
        first = rows[0]["schedule"]
        sched = " / ".join(",".join(f"{v:.3g}" for v in first[k]) for k in SCHEDULES)
        per = [r["seconds_per_hypergradient"] for r in rows if r["seconds_per_hypergradient"]]
        lines.append(
            f"| {arm} | {np.mean([r['val_accuracy_final'] for r in rows]):.4f} | "
            f"{np.mean([r['test_loss'] for r in rows]):.4f} | {sched} | "
            f"{np.mean([r['seconds'] for r in rows]):.1f} | "
            + (f"{np.mean(per):.2f} |" if per else "- |"))
    return "\n".join(lines) + "\n"


def plot(records, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seed = config.seeds[0]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    T = config.inner_steps
    for arm in config.arms:
        record = records.get((arm, seed))
        if record is None:
            continue
        for ax, name in zip(axes[:3], SCHEDULES):
            if arm in ("greedy", "hyperdistill") and record["history"]:
                steps = [h["step"] for h in record["history"]] + [T]
                values = [h["schedule"][name][0] for h in record["history"]]
                ax.step(steps, values + values[-1:], where="post", label=arm)
            else:
                values = record["schedule"][name]
                edges = [(b * T + len(values) - 1) // len(values) for b in range(len(values))]
                ax.step(edges + [T], values + values[-1:], where="post", label=arm)
    for ax, name in zip(axes[:3], ("learning rate", "momentum gamma", "weight decay")):
        ax.set(xlabel="inner step", ylabel=name, title=f"{name} (seed {seed})")
        ax.legend(fontsize=7)
    for arm in config.arms:
        rows = [r for (a, _), r in sorted(records.items()) if a == arm and r["history"]
                and "val_accuracy" in r["history"][0]]
        for i, r in enumerate(rows):
            axes[3].plot([h["outer_step"] for h in r["history"]],
                         [h["val_accuracy"] for h in r["history"]], alpha=0.7,
                         color={"forward": "C2", "reversible": "C3"}.get(arm, "C4"),
                         label=arm if i == 0 else None)
    axes[3].set(xlabel="outer step", ylabel="validation accuracy of the run",
                title="Validation accuracy against outer step")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    config, _ = runner.setup(Config)
    data = load_data(config)
    runner.log(f"Fashion-MNIST: {len(data.y_train)} training, {len(data.y_val)} validation, "
               f"{len(data.y_test)} test examples; horizon {config.inner_steps} steps, "
               f"{config.blocks} blocks x {len(SCHEDULES)} schedules")
    experiment = Experiment(config, data)
    records = runner.run_grid(config, lambda arm, seed, _: run_arm(experiment, arm, seed))
    table, _ = runner.summarise(records, config, ("final",), metric="test_accuracy",
                                rate_column=False, labels={"final": "test accuracy"})
    table += details_table(records, config)
    with open(os.path.join(config.output_dir, "summary.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    if config.plot:
        plot(records, config, os.path.join(config.output_dir, "lr_schedules.png"))


if __name__ == "__main__":
    app.run(main)
