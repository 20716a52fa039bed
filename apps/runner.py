r"""The one runner of the apps: config, strategy flags, seeding, arms x seeds with resume,
fine-tuning modes, exports and the paired summary.

An app defines its absl flags, a `Config` dataclass whose fields are named like its flags
(filled once, in ``main``, by ``Config.from_flags``; nothing else reads FLAGS), and the
function that runs one (arm, seed). The runner does the rest:

    runner.define_strategy_flags("pre-training")    # --strategy, --devices, --tpu_address
    runner.define_dtype_policy_flag()               # --dtype_policy (optional)
    flags.adopt_module_key_flags(runner)            # ... listed by the app's --helpshort

    def main(argv):
        config, strategy = runner.setup(Config)     # Config.from_flags(FLAGS), strategy
        records = runner.run_grid(config, run_arm, prepare=prepare_seed)
        table, summary = runner.summarise(records, config, modes=("full", "linear"))

`run_grid` loops seeds x arms. A finished (arm, seed) stores its result as
``<output_dir>/results/<arm>_seed<k>.json`` together with ``config``: the flags that affect
results (`Config.results_config`). With ``resume``, a stored result is reused only when its
config equals the current one; otherwise the run is repeated, and a log line says which
settings differ. `summarise` writes summary.md and summary.json: per arm the mean +- std
over seeds of each fine-tuning mode's test AUROC, the per-seed values, and for every arm
but the baseline the mean paired (same-seed) difference to the baseline with a 95%
Student-t interval (two seeds or more).

Determinism: a seed fixes a run. `seed_everything(seed)` (Python, NumPy, TensorFlow and
Keras seeds, and TensorFlow op determinism) runs before every (arm, seed), before a seed's
shared data are prepared, and before every fine-tuning (seed + FT_SEED_OFFSET, so the
fine-tuning heads and data order are the same for every arm of a seed: the comparison is
paired). Nothing carries over from an arm run earlier in the same process, the tf.data
shuffles and the augmentation layers take explicit seeds, and no result depends on Python's
hash order. On one device `setup` also gives TensorFlow a single inter-op thread: the
learned-augmentation hyperstep (SimCLR meta arm) otherwise differs in the last bits from run
to run, as independent ops finish in a varying order (kernels keep their intra-op threads;
the tiny runs' PT throughput on 2 cores did not change measurably). On CPU two runs with the
same flags give bit-identical results on one machine; a run killed and resumed agrees with an
uninterrupted one to float rounding (tests/faults/test_kill_and_resume.py: bit for bit on an AMD
EPYC; on one other CPU the resumed SimCLR meta arm's learned strength came out 4 float32 ulps
off). Op determinism also swaps a few kernels for deterministic ones (e.g. sparse softmax cross-entropy becomes a gather, which XLA
cannot differentiate inside a while loop: apps/digits_reweighting.py writes that loss with
plain ops). The timing benchmarks seed their data and weights but leave op determinism off,
so that they time the kernels users run.

What stays nondeterministic on a GPU: op determinism makes cuDNN convolutions, segment sums
(the GIN's message passing, gather gradients) and reductions use deterministic kernels and
raises an error for an op that has none, but it is not tested here. ``--xla`` runs leave op
determinism off (Keras compiles without XLA while it is on), so they are not guaranteed to
repeat bit for bit; the apps default to --noxla. Results on a
GPU differ from those on a CPU (other kernels, other rounding); under
--strategy=mirrored/multiworker/tpu the cross-replica all-reduces (NCCL, collectives) may sum
in a varying order, and the inter-op thread count is left alone. Timings (examples/s,
seconds per epoch) are never reproducible.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable, ClassVar, Optional

from absl import app, flags, logging

__all__ = ["Config", "GridConfig", "FT_MODES", "FT_SEED_OFFSET", "FineTuned",
           "define_strategy_flags", "GIN_RESULTS_ENTRY", "define_dtype_policy_flag",
           "HYPERDISTILL_BOUNDS", "define_hyperdistill_flags", "hyperdistill_estimator",
           "check_online_arm", "hyperdistill_fields", "check_in_interval", "data_digest",
           "setup", "seed_everything", "result_path",
           "config_differences", "run_grid", "run_directory", "claim_directory", "load_results",
           "fine_tune", "export_finetuned", "summarise", "summary_table", "paired_table",
           "write_json", "resume_run", "mean_and_interval", "one_sample_t", "distinct_counts"]

# label in the log, label in the tables
FT_MODES = {"full": ("full fine-tuning", "full FT test AUROC"),
            "linear": ("linear evaluation", "linear eval test AUROC")}
FT_SEED_OFFSET = 1000  # fine-tuning of seed k runs under seed k + 1000 (the same for every arm)
RATE_KEY, RATE_LABEL = "pt_examples_per_second", "PT examples/s"


# ----------------------------------------------------------------------------- flags, config

def define_strategy_flags(what, flag_values=flags.FLAGS):
    """Defines --strategy, --devices and --tpu_address (``what`` says what runs distributed,
    e.g. "pre-training"); `Config.strategy_object()` builds the strategy. The flags belong to
    this module: an app lists them in its --helpshort with
    ``flags.adopt_module_key_flags(runner)``. A second call in one process keeps the first
    definition."""
    from keras_metapt.distribute import STRATEGIES
    if "strategy" in flag_values:
        return
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      f"tf.distribute strategy of {what}: default (one device), mirrored (local "
                      "GPUs, or --devices), multiworker (TF_CONFIG names the cluster; run the same "
                      "command on every worker), tpu (--tpu_address).", flag_values=flag_values)
    flags.DEFINE_list("devices", None, "--strategy=mirrored: devices to mirror over (e.g. "
                      "/gpu:0,/gpu:1); default all local GPUs, or the CPU.",
                      flag_values=flag_values)
    flags.DEFINE_string("tpu_address", None, "TPU name or grpc:// address for --strategy=tpu.",
                        flag_values=flag_values)


def define_run_flags(name, flag_values=flags.FLAGS):
    """Defines --output_dir (default runs/<name>), --resume, --verbose (0, 1 or 2) and --plot
    (writes <name>.png), the run flags of a grid app; they belong to this module (see
    `define_strategy_flags`)."""
    flags.DEFINE_string("output_dir", f"runs/{name}", "Results, plot and checkpoints.",
                        flag_values=flag_values)
    flags.DEFINE_bool("resume", True, "Reuse finished (arm, seed) results and resume unfinished "
                      "ones from their last checkpoint, when made with the same settings.",
                      flag_values=flag_values)
    flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar; 2: a line per checkpoint.",
                         flag_values=flag_values)
    flags.DEFINE_bool("plot", True, f"Write {name}.png.", flag_values=flag_values)


HYPERDISTILL_BOUNDS = {"hyperdistill_gamma": "[0, 1]", "hyperdistill_every": "[0, inf)",
                       "hyperdistill_reference_steps": "[1, inf)",
                       "hyperdistill_anchor_every": "[0, inf)"}


def define_hyperdistill_flags(arm, every_default, flag_values=flags.FLAGS, gamma_default=0.99,
                              reference_steps_default=100, anchor_every_default=0):
    """Defines the settings of `keras_metapt.HyperDistill` for an app's ``arm`` (its Config
    then has the fields of HYPERDISTILL_BOUNDS); `hyperdistill_estimator` builds it."""
    if "hyperdistill_gamma" in flag_values:
        return
    flags.DEFINE_float("hyperdistill_gamma", gamma_default, f"{arm}: damping gamma of the online "
                       "hypergradient it distils (1: the whole past undamped; 0: one step).",
                       flag_values=flag_values)
    flags.DEFINE_integer("hyperdistill_every", every_default, f"{arm}: a DrMAD-style reference, "
                         "and a refit of the scale theta, every this many steps (0: never; "
                         "theta stays 1).", flag_values=flag_values)
    flags.DEFINE_integer("hyperdistill_reference_steps", reference_steps_default,
                         f"{arm}: horizon cap of a reference, in steps (each costs one step "
                         "VJP).", flag_values=flag_values)
    flags.DEFINE_integer("hyperdistill_anchor_every", anchor_every_default,
                         f"{arm}: move the anchor of the distilled point's line to the current "
                         "weights every this many steps (0: the line runs from the initial "
                         "weights, as in the paper).", flag_values=flag_values)


def hyperdistill_estimator(config, learning_rate, reduce=None):
    """`keras_metapt.HyperDistill` with inner SGD at ``learning_rate`` and the config's
    hyperdistill_* settings (see `define_hyperdistill_flags`)."""
    import keras_metapt as km
    return km.HyperDistill(km.optim.sgd(learning_rate), config.hyperdistill_gamma,
                           distill_every=config.hyperdistill_every,
                           reference_steps=config.hyperdistill_reference_steps,
                           anchor_every=config.hyperdistill_anchor_every or None,
                           gradient_reduction=reduce)


def check_online_arm(config, arm, replicas=None):
    """UsageError unless ``arm`` (HyperDistill's online PT stage), when among the config's
    arms, runs as it can: float32 parts and, given ``replicas``, one replica."""
    if arm not in config.arms:
        return
    if config.dtype_policy != "float32":
        raise app.UsageError(f"--arms={arm} runs in float32: HyperDistill's online term does "
                             f"not take --dtype_policy={config.dtype_policy}")
    if replicas is not None and replicas > 1:
        raise app.UsageError(f"--arms={arm} runs on one replica, not {replicas} "
                             f"(--strategy={config.strategy})")


def hyperdistill_fields(online):
    """The record fields of a MetaPretrainer's HyperDistill (``online``) at the end of PT:
    its fitted scale theta, references taken and PT steps counted; {} for None."""
    if online is None:
        return {}
    return {"hyperdistill_scale": float(online.scale),
            "hyperdistill_references": int(online.state.references.numpy()),
            "hyperdistill_steps": int(online.state.step.numpy())}


DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def define_dtype_policy_flag(flag_values=flags.FLAGS):
    """Defines --dtype_policy (Keras mixed precision for every model of the run); an app with
    it has a ``dtype_policy`` Config field, and `setup` sets the global Keras policy."""
    if "dtype_policy" in flag_values:
        return
    flags.DEFINE_enum(
        "dtype_policy", "float32", list(DTYPE_POLICIES),
        "Keras dtype policy of every model (PT, FT, evaluation): float32; mixed_bfloat16 "
        "(bfloat16 compute, float32 variables; for TPUs and recent GPUs/CPUs); mixed_float16 "
        "(float16 compute, float32 variables, dynamic loss scaling of the PT, FT and hyper "
        "updates; for GPUs). Losses, phi and hypergradients stay float32. On CPUs without "
        "native half precision, mixed policies run slower than float32.",
        flag_values=flag_values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """An app's experiment config: one field per flag, same name; lists become tuples.

    Subclasses add their fields and name in ``NOT_IN_RESULTS`` the fields that do not change
    results (where outputs go, verbosity, ...); every other field is part of
    `results_config`.
    """

    output_dir: str
    resume: bool
    strategy: str
    devices: Optional[tuple]
    tpu_address: Optional[str]

    NOT_IN_RESULTS: ClassVar[tuple] = ("output_dir", "resume", "tpu_address")
    # field -> the interval its value must lie in, e.g. "[1, inf)", "(0, 1)", "[0, 1]"; every
    # numeric field has one (tests/apps/test_validation.py). None passes (an unset option).
    BOUNDS: ClassVar[dict] = {}
    # fields naming input files or folders, whose contents are part of `results_config`
    DATA_PATHS: ClassVar[tuple] = ()
    # arm -> the fields that only that arm reads (see `unread_settings`)
    ARM_SETTINGS: ClassVar[dict] = {}

    def __post_init__(self):
        for name, interval in self.BOUNDS.items():
            check_in_interval(name, getattr(self, name), interval)

    @classmethod
    def from_flags(cls, flag_values=flags.FLAGS):
        """The config of the parsed flags (call in ``main``)."""
        values = {}
        for field in dataclasses.fields(cls):
            value = flag_values[field.name].value
            values[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def results_config(self):
        """The settings that affect results, as stored with each result (JSON types): every
        field but ``NOT_IN_RESULTS``, and for each field of ``DATA_PATHS`` that names a file
        or folder, ``<field>_sha256``, the digest of what it holds (`data_digest`), so that
        other data under the same path is never taken for the same run."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in self.NOT_IN_RESULTS}
        for name in self.data_paths():
            path = getattr(self, name)
            if path and os.path.exists(path):
                config[f"{name}_sha256"] = data_digest(path)
        return json.loads(json.dumps(config))

    def data_paths(self):
        """The fields of ``DATA_PATHS`` that this configuration reads (an app whose flags
        choose between data sources leaves out the ones not chosen)."""
        return self.DATA_PATHS

    def config_sha256(self, arm=None):
        """SHA-256 of `results_config` (canonical JSON; of ``results_config_of(arm)`` for an
        arm): the key stored with every result."""
        config = self.results_config() if arm is None else self.results_config_of(arm)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def results_config_of(self, arm):
        """The settings that affect ``arm``'s results: `results_config` without the settings
        that only other arms read (`unread_settings`)."""
        config = self.results_config()
        for name in self.unread_settings(arm):
            config.pop(name, None)
        return config

    def unread_settings(self, arm):
        """The settings of other arms (``ARM_SETTINGS``) that ``arm`` never reads: left out of
        its results config, so that changing one arm's setting reruns that arm alone. A stored
        result that still lists them (made before they were left out) is reused all the same
        (`config_differences`' ``ignore``)."""
        own = set(self.ARM_SETTINGS.get(arm, ()))
        return tuple(sorted({n for names in self.ARM_SETTINGS.values() for n in names} - own))

    def strategy_object(self):
        """The tf.distribute strategy named by --strategy / --devices / --tpu_address."""
        from keras_metapt.distribute import get_strategy
        return get_strategy(self.strategy, self.tpu_address, self.devices)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridConfig(Config):
    """A config of arms x seeds. ``ARMS``: the app's arms in table order."""

    arms: tuple
    seeds: tuple
    baseline: str

    ARMS: ClassVar[tuple] = ()
    NOT_IN_RESULTS: ClassVar[tuple] = Config.NOT_IN_RESULTS + ("arms", "seeds", "baseline")

    def __post_init__(self):
        super().__post_init__()
        unknown = [a for a in self.arms if a not in self.ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise app.UsageError(f"--arms={','.join(self.arms)}: give distinct arms out of "
                                 f"{', '.join(self.ARMS)}")
        if self.baseline not in self.ARMS:
            raise app.UsageError(f"--baseline={self.baseline}: one of {', '.join(self.ARMS)}")
        try:
            seeds = tuple(int(s) for s in self.seeds)
        except ValueError:
            raise app.UsageError(f"--seeds={','.join(map(str, self.seeds))}: integers") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise app.UsageError(f"--seeds={','.join(map(str, seeds))}: distinct integers")
        object.__setattr__(self, "seeds", seeds)

    @property
    def last_seed(self):
        return self.seeds[-1]


# Recorded with the results of every run that trains a GIN (`keras_metapt.nets.GIN`): its
# BatchNorm statistics have left the padding slots out since this entry exists, so results
# stored before it (statistics over every slot) are never taken for the current code's.
GIN_RESULTS_ENTRY = {"gin_batch_statistics": "real_nodes"}

_DIGESTS = {}
_WHOLE_FILE_LIMIT = 64 << 20  # folders: files up to this size are hashed whole


def _file_digest(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def data_digest(path):
    """SHA-256 of a file's bytes; for a folder, of its file list (relative path and size) and
    the bytes of every file up to 64 MiB (larger files, e.g. a raw signal archive, enter by
    size only). Cached per (path, size, modification time)."""
    if os.path.isfile(path):
        return _file_digest(path)
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(folder, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            if size <= _WHOLE_FILE_LIMIT:
                digest.update(_file_digest(full).encode())
    return digest.hexdigest()


def check_in_interval(name, value, interval):
    """Raises app.UsageError naming ``--name`` unless ``value`` lies in ``interval``, written
    "[low, high]" with "(" / ")" for open ends and "inf" for no bound (None passes)."""
    if value is None:
        return
    low, high = (float(x) for x in interval[1:-1].split(","))
    inside = ((value > low or (interval[0] == "[" and value == low))
              and (value < high or (interval[-1] == "]" and value == high)))
    if not inside or value != value:  # NaN
        raise app.UsageError(f"--{name}={value}: must lie in {interval}")


def setup(config_class, flag_values=flags.FLAGS):
    """The start of an app's ``main``, before TensorFlow runs anything: absl logging at
    WARNING, the config of the parsed flags, one inter-op thread on one device (see the
    module docstring), and the strategy the config names. Returns (config, strategy)."""
    import tensorflow as tf
    logging.set_verbosity(logging.WARNING)
    config = config_class.from_flags(flag_values)
    if hasattr(config, "dtype_policy"):  # before any model is built
        import keras
        keras.mixed_precision.set_global_policy(config.dtype_policy)
    # Keras refuses jit_compile while op determinism is on (model_supports_jit): an app's
    # --xla on one device trades the bit-exact reruns for XLA (the apps compile without XLA
    # under a multi-replica strategy, which keeps op determinism).
    _OP_DETERMINISM["on"] = not (getattr(config, "xla", False) and config.strategy == "default")
    if not _OP_DETERMINISM["on"]:
        from tensorflow.python.framework import config as tf_config
        tf_config.disable_op_determinism()  # in case an earlier run in this process enabled it
    if config.strategy == "default":
        # Independent ops then run one after another in a fixed order: a graph whose result
        # depends on that order (found in the learned-augmentation hyperstep) stays
        # reproducible. Kernels keep their intra-op threads.
        tf.config.threading.set_inter_op_parallelism_threads(1)
    return config, config.strategy_object()


_OP_DETERMINISM = {"on": True}  # off for runs that compile with XLA (see `setup`)


def seed_everything(seed):
    """Python, NumPy, TensorFlow and Keras seeds, and TensorFlow op determinism (unless the
    run compiles with XLA: Keras silently compiles without XLA while op determinism is on)."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(int(seed))
    if _OP_DETERMINISM["on"]:
        tf.config.experimental.enable_op_determinism()


# ----------------------------------------------------------------------------- arms x seeds

def log(message):
    print(message, flush=True)


def result_path(results_dir, arm, seed):
    return os.path.join(results_dir, f"{arm}_seed{seed}.json")


def write_json(path, value):
    """Writes JSON atomically (an interrupted run leaves no half-written result)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def write_report(output_dir, stem, markdown, payload):
    """<output_dir>/<stem>.md (the table) and <stem>.json (the figures), written atomically."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{stem}.md")
    with open(f"{path}.tmp", "w") as f:
        f.write(markdown)
    os.replace(f"{path}.tmp", path)
    write_json(os.path.join(output_dir, f"{stem}.json"), payload)


def config_differences(stored, wanted, ignore=()):
    """'name: stored -> wanted' for every setting that differs (None: no stored config);
    a setting of ``ignore`` that ``wanted`` does not hold is not compared."""
    if stored is None:
        return ["no config stored"]
    keys = sorted((set(stored) | set(wanted)) - (set(ignore) - set(wanted)))
    return [f"{k}: {stored.get(k, '(unset)')!r} -> {wanted.get(k, '(unset)')!r}"
            for k in keys if stored.get(k, "(unset)") != wanted.get(k, "(unset)")]


def run_grid(config: GridConfig, run_arm: Callable[[str, int, Any], dict],
             prepare: Optional[Callable[[int], Any]] = None, results_dir=None):
    """Runs every (arm, seed) of ``config`` that has no reusable stored result.

    ``prepare(seed) -> context`` (optional) builds what the arms of a seed share (data
    orders); it runs once per seed, only if an arm of that seed runs. ``run_arm(arm, seed,
    context) -> dict`` runs one arm; the runner adds arm, seed and config and stores it.
    Both run right after `seed_everything(seed)`. Returns {(arm, seed): record}.
    """
    results_dir = results_dir or os.path.join(config.output_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    records = {}
    for seed in config.seeds:
        prepared, context = False, None
        for arm in config.arms:
            wanted, key = config.results_config_of(arm), config.config_sha256(arm)
            path = result_path(results_dir, arm, seed)
            if config.resume and os.path.exists(path):
                with open(path) as f:
                    stored = json.load(f)
                differences = config_differences(stored.get("config"), wanted,
                                                 config.unread_settings(arm))
                if not differences:
                    log(f"seed {seed} {arm}: done earlier ({path})")
                    records[(arm, seed)] = stored
                    continue
                log(f"seed {seed} {arm}: the stored result {path} was made with other settings "
                    f"({'; '.join(differences)}); running it again")
            if prepare is not None and not prepared:
                seed_everything(seed)
                context, prepared = prepare(seed), True
            log(f"seed {seed} {arm}: running")
            seed_everything(seed)
            record = {"arm": arm, "seed": seed, **run_arm(arm, seed, context), "config": wanted,
                      "config_sha256": key}
            write_json(path, record)
            records[(arm, seed)] = record
    return records


def run_directory(config, arm, seed):
    """``<output_dir>/<arm>_seed<k>``, for a run's checkpoints (see `claim_directory`)."""
    path = os.path.join(config.output_dir, f"{arm}_seed{seed}")
    claim_directory(path, config, arm)
    return path


def claim_directory(directory, config, arm=None):
    """Makes ``directory`` hold the state (checkpoints) of runs with ``config``'s results
    config (``arm``'s, `GridConfig.results_config_of`, for an arm's run). Returns True when
    what it holds can be resumed (``config.resume`` and the same settings); otherwise empties
    it (with a log line when it held anything) and returns False."""
    wanted = config.results_config() if arm is None else config.results_config_of(arm)
    stamp = os.path.join(directory, "config.json")
    if os.path.isdir(directory) and os.listdir(directory):
        stored = None
        if os.path.exists(stamp):
            with open(stamp) as f:
                stored = json.load(f)
        differences = config_differences(
            stored, wanted, () if arm is None else config.unread_settings(arm))
        if config.resume and not differences:
            return True
        why = ("--noresume" if not config.resume
               else f"made with other settings ({'; '.join(differences)})")
        log(f"{directory}: {why}; starting over")
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    write_json(stamp, wanted)
    return False


def resume_run(directory, items, history, progress, key=None, unit="step"):
    """An (arm, seed)'s checkpointed training under ``directory`` (`run_directory`): a
    checkpoint of ``items`` (name -> trackable; the last one kept) and ``history`` (name ->
    list, one row per checkpoint) in history.json. When a checkpoint exists it is restored,
    and the stored history's row lists (the names in ``history`` as given) are cut to the rows
    it covers (a run killed between writing a row and saving its checkpoint left one more):
    with ``key``, the rows whose ``history[key]`` is at most ``progress()`` (read after the
    restore), else the first ``progress()`` rows. Lists the run added under other names (e.g.
    one entry per process) come back whole.
    Returns (history, save); ``save(history)`` writes the history, then the checkpoint."""
    import tensorflow as tf
    checkpoint = tf.train.Checkpoint(**items)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(directory, "ckpt"), 1)
    path = os.path.join(directory, "history.json")
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        done = int(progress())
        with open(path) as f:
            stored = json.load(f)
        rows = len(next(iter(stored.values()), []))
        keep = ([i for i, value in enumerate(stored[key]) if value <= done] if key
                else range(min(done, rows)))
        history = {name: [values[i] for i in keep] if name in history else values
                   for name, values in stored.items()}
        log(f"  resumed at {unit} {done} ({manager.latest_checkpoint})")

    def save(rows):
        write_json(path, rows)
        manager.save()
    return history, save


def distinct_counts(name, values):
    """The list flag ``--name`` as a tuple of distinct integers >= 1 (app.UsageError naming
    the flag otherwise)."""
    try:
        counts = tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name}={','.join(map(str, values))}: integers") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise app.UsageError(f"--{name}={','.join(map(str, counts))}: distinct integers >= 1")
    return counts


def mean_and_interval(values):
    """Mean and the half-width of its 95% normal interval (1.96 std / sqrt(n); NaN for one
    value), e.g. over a seed's test episodes."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


def one_sample_t(samples):
    """Per column of ``samples`` [n, k]: the one-sample t statistic of its mean against 0,
    mean / (std / sqrt(n)) with the std over n - 1 (a zero std counts as 1e-30)."""
    import numpy as np
    samples = np.asarray(samples)  # (in its own precision)
    spread = samples.std(0, ddof=1) / np.sqrt(len(samples))
    return samples.mean(0) / np.maximum(spread, 1e-30)


def load_results(results_dir, arms, seeds):
    """{(arm, seed): record} of the stored results that exist."""
    records = {}
    for seed in seeds:
        for arm in arms:
            path = result_path(results_dir, arm, int(seed))
            if os.path.exists(path):
                with open(path) as f:
                    records[(arm, int(seed))] = json.load(f)
    return records


# ----------------------------------------------------------------------------- fine-tuning

@dataclasses.dataclass
class FineTuned:
    """One fine-tuning's outcome: test AUROC, the fine-tuned model and its encoder; ``fields``
    go into the record with the mode as suffix, ``note`` into the log line."""

    test_auroc: float
    model: Any
    encoder: Any
    fields: dict = dataclasses.field(default_factory=dict)
    note: str = ""


def fine_tune(record, seed, modes, finetune: Callable[..., FineTuned]):
    """Runs ``finetune(linear=...)`` for each mode of ``modes`` ("full", "linear"), each after
    `seed_everything(seed + FT_SEED_OFFSET)`; stores test_auroc_<mode> (and the fields) in
    ``record``. Returns {mode: FineTuned}."""
    results = {}
    for mode in modes:
        seed_everything(seed + FT_SEED_OFFSET)
        result = finetune(linear=mode == "linear")
        record[f"test_auroc_{mode}"] = float(result.test_auroc)
        for key, value in result.fields.items():
            record[f"{key}_{mode}"] = value
        log(f"  {FT_MODES[mode][0]}: test AUROC {result.test_auroc:.4f}{result.note}")
        results[mode] = result
    return results


def export_finetuned(result: FineTuned, saved_models_dir, run_name, input_spec):
    """SavedModels <run_name>_finetuned and <run_name>_encoder (output "features")."""
    from keras_metapt import export
    return {"finetuned": export.export_saved_model(result.model, saved_models_dir,
                                                   f"{run_name}_finetuned", input_spec),
            "encoder": export.export_saved_model(result.encoder, saved_models_dir,
                                                 f"{run_name}_encoder", input_spec,
                                                 output_name="features")}


# ----------------------------------------------------------------------------- summary

def _mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def paired_difference(values, baseline_values):
    """Mean of the per-seed differences and its 95% Student-t interval (None below 2 seeds)."""
    from scipy import stats
    diffs = [a - b for a, b in zip(values, baseline_values)]
    n = len(diffs)
    mean = sum(diffs) / n
    out = {"mean_difference": mean, "ci95": None, "seeds": n}
    if n >= 2:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out["ci95"] = [mean - half, mean + half]
    return out


def summarise(records, config: GridConfig, modes, output_dir=None, metric="test_auroc",
              labels=None, rate_column=True, appendix=""):
    """summary.md and summary.json in ``output_dir`` (default config.output_dir) from the
    records of `run_grid`; returns (markdown, summary).

    Each record holds ``<metric>_<mode>`` per mode (test_auroc_full, ...); ``labels`` names
    the table columns per mode (default `FT_MODES`'s); ``appendix`` (markdown) is added
    after the tables.

    summary[arm]: <mode>_mean, <mode>_std (over seeds), seeds, pt_examples_per_second (mean,
    None for an arm without PT), per_seed {seed: {mode: AUROC}}, and for an arm other than
    the baseline ``paired``: {baseline, <mode>: {mean_difference, ci95 [low, high], seeds}}
    over the seeds both arms ran.
    """
    summary = {}
    for arm in config.ARMS:
        rows = sorted((r for (a, _), r in records.items() if a == arm), key=lambda r: r["seed"])
        if not rows:
            continue
        entry = {}
        for mode in modes:
            entry[f"{mode}_mean"], entry[f"{mode}_std"] = _mean_std(
                [r[f"{metric}_{mode}"] for r in rows])
        rates = [r[RATE_KEY] for r in rows if RATE_KEY in r]
        entry["seeds"] = len(rows)
        entry[RATE_KEY] = sum(rates) / len(rates) if rates else None
        entry["per_seed"] = {str(r["seed"]): {m: r[f"{metric}_{m}"] for m in modes} for r in rows}
        summary[arm] = entry
    base = config.baseline
    if base in summary:
        for arm, entry in summary.items():
            if arm == base:
                continue
            seeds = [s for s in entry["per_seed"] if s in summary[base]["per_seed"]]
            if seeds:
                entry["paired"] = {"baseline": base, **{m: paired_difference(
                    [entry["per_seed"][s][m] for s in seeds],
                    [summary[base]["per_seed"][s][m] for s in seeds]) for m in modes}}
    table = (summary_table(summary, modes, rate_column=rate_column, labels=labels)
             + paired_table(summary, modes, labels=labels) + appendix)
    output_dir = output_dir or config.output_dir
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(output_dir, "summary.json"), summary)
    return table, summary


def _column_labels(modes, labels):
    return [(labels or {}).get(m) or FT_MODES[m][1] for m in modes]


def summary_table(summary, modes, names=None, seeds_column=True, rate_column=True, labels=None):
    """The markdown table: arm | <mode> mean +- std ... | PT examples/s | seeds."""
    names = names or {}
    header = ["arm"] + _column_labels(modes, labels) + [RATE_LABEL] * rate_column \
        + ["seeds"] * seeds_column
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for arm, s in summary.items():
        cells = [names.get(arm, arm)] + [f"{s[f'{m}_mean']:.4f} +- {s[f'{m}_std']:.4f}"
                                         for m in modes]
        if rate_column:
            cells.append(f"{s[RATE_KEY]:.0f}" if s[RATE_KEY] else "-")
        if seeds_column:
            cells.append(str(s["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_paired(d):
    """A `paired_difference` as "mean [low, high]" (no interval below 2 seeds)."""
    if d["ci95"] is None:
        return f"{d['mean_difference']:+.4f} (1 seed: no interval)"
    return f"{d['mean_difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def paired_table(summary, modes, names=None, labels=None):
    """The paired differences to the baseline as markdown ("" when there are none)."""
    names = names or {}
    rows = [(arm, s["paired"]) for arm, s in summary.items() if "paired" in s]
    if not rows:
        return ""
    base = rows[0][1]["baseline"]
    lines = ["", f"Paired difference to {names.get(base, base)} (same seed: arm - baseline; "
             "mean over seeds [95% t interval]):", "",
             "| arm | " + " | ".join(_column_labels(modes, labels)) + " | seeds |",
             "|---" + "|---:" * (len(modes) + 1) + "|"]
    for arm, paired in rows:
        lines.append(f"| {names.get(arm, arm)} | " + " | ".join(format_paired(paired[m]) for m in modes)
                     + f" | {paired[modes[0]]['seeds']} |")
    return "\n".join(lines) + "\n"
