r"""MetaPretrainer cost against plain pre-training.

    python -m benchmarks.meta_pt            # reference configuration (a few minutes on 2 cores)
    python -m benchmarks.meta_pt --quick    # tiny sizes, a smoke run

Reference configuration (kept as the defaults so results compare with other
implementations): MLP encoder 128-256-256-256 (ReLU), PT head 256->500 tasks (sigmoid BCE
with TaskWeights), FT head 256->10 tasks (sigmoid BCE), batch 64, hyperstep every N=10 steps,
K=1 FT unroll step, i=1 Neumann term, Adam everywhere, float32, random data (seed 0).

Measured, each with and without XLA (jit_compile), in one process:
* plain PT step: a plain Keras model (encoder + PT head, uniform weights) trained with fit();
* meta-PT step: MetaPretrainer.fit() with a hyperstep every N steps (no warm-up), averaged;
* both as time per step: after a warm-up epoch each, --rounds rounds alternate one plain and
  one meta-PT epoch of --steps steps (so machine drift hits both alike); the ratio is the
  median of the per-round ratios;
* hyperstep and plain PT step as compiled functions on one fixed batch (median of --repeats);
* for each hyperstep variant of --hypersteps: the exact Neumann IFT hyperstep (the reference
  configuration) and the first-order one (`km.hypergrad.first_order()`, SAMA), each in its
  own MetaPretrainer, timed in the same rounds against the same plain PT;
* memory (--memory, float32, tf.function): the tensors the plain PT step and each hyperstep
  hold at once on their second call (`benchmarks.memory.peak_requested_mib`: bytes requested
  from TensorFlow's BFC allocator, each in a fresh process; variables made before the call,
  such as the weights and optimizer slots, are not counted);
* for each Keras dtype policy of --dtype_policies (default float32, the reference), the
  same measurements with every part built under that policy (plain PT under it too, with
  Keras' loss scaling for mixed_float16): float32 variables, half-precision compute.

Writes benchmarks/results/meta_pt.{md,json,png} (or --output_dir); --plot_only redraws the
plot from a stored meta_pt.json.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_metapt.callbacks import EpochTimer  # noqa: E402
from keras_metapt.hyper import TaskWeights  # noqa: E402
from keras_metapt.losses import masked_multitask_bce  # noqa: E402
from apps import runner  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_dim", 128, "Input features.")
flags.DEFINE_list("hidden", ["256", "256", "256"], "Encoder widths (the last is the feature size).")
flags.DEFINE_integer("pt_tasks", 500, "PT tasks (TaskWeights size).")
flags.DEFINE_integer("ft_tasks", 10, "FT tasks.")
flags.DEFINE_integer("batch", 64, "Batch size of every stream.")
flags.DEFINE_integer("hyperstep_every", 10, "N.")
flags.DEFINE_integer("unroll_steps", 1, "K.")
flags.DEFINE_integer("neumann_terms", 1, "i.")
flags.DEFINE_list("hypersteps", ["neumann", "first_order"], "Hyperstep variants to time, each "
                  "against the same plain PT: neumann (exact IFT: i Neumann terms, the "
                  "reference) and first_order (SAMA: hypergrad.first_order, the PT Adam's "
                  "update Jacobian, no HVP).")
flags.DEFINE_list("dtype_policies", ["float32"], "Keras dtype policies to measure, each with its "
                  "own plain PT: float32 (the reference), mixed_bfloat16, mixed_float16.")
flags.DEFINE_integer("steps", 100, "Steps per timed epoch.")
flags.DEFINE_integer("rounds", 5, "Alternating plain / meta-PT timed epochs (median).")
flags.DEFINE_integer("repeats", 20, "Calls for the function-level timings (median).")
flags.DEFINE_bool("memory", True, "Also measure the tensors the plain PT step and each "
                  "hyperstep hold at once (float32, tf.function; a fresh process each).")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("child", None, "Internal: 'plain' or a --hypersteps variant: print the "
                    "peak MiB of tensors its function holds (BFC allocator) as JSON.")
flags.DEFINE_bool("plot_only", False, "Only redraw meta_pt.png from the meta_pt.json in "
                  "--output_dir (no measurement).")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where meta_pt.md and meta_pt.json are written.")


def data():
    rng = np.random.default_rng(0)
    n = 4096
    x = rng.normal(size=(n, FLAGS.input_dim)).astype("float32")
    y_pt = (rng.random((n, FLAGS.pt_tasks)) < 0.5).astype("float32")
    y_ft = (rng.random((n, FLAGS.ft_tasks)) < 0.5).astype("float32")
    return x, y_pt, y_ft


POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def parts():
    """Encoder, PT head and FT head, built under the current global dtype policy."""
    keras.utils.set_random_seed(0)
    hidden = [int(h) for h in FLAGS.hidden]
    encoder = keras.Sequential([keras.Input((FLAGS.input_dim,))]
                               + [keras.layers.Dense(h, activation="relu") for h in hidden],
                               name="encoder")
    pt_head = keras.Sequential([keras.Input((hidden[-1],)), keras.layers.Dense(FLAGS.pt_tasks)],
                               name="pt_head")
    ft_head = keras.Sequential([keras.Input((hidden[-1],)), keras.layers.Dense(FLAGS.ft_tasks)],
                               name="ft_head")
    return encoder, pt_head, ft_head


def ft_loss(y, p):
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=p))


def plain_pt(xla, x, y_pt):
    """A plain Keras PT model, its stream, and one compiled train step on a fixed batch."""
    encoder, pt_head, _ = parts()
    model = keras.Sequential([encoder, pt_head])
    model.compile(keras.optimizers.Adam(1e-3),
                  loss=lambda y, p: masked_multitask_bce(y, tf.cast(p, tf.float32)),
                  jit_compile=xla)
    ds = tf.data.Dataset.from_tensor_slices((x, y_pt)).batch(FLAGS.batch, drop_remainder=True)
    batch = next(iter(ds))

    @tf.function(jit_compile=xla)
    def step(xb, yb):  # what fit's train step does, as one function
        with tf.GradientTape() as tape:
            loss = masked_multitask_bce(yb, tf.cast(model(xb, training=True), tf.float32))
            scaled = model.optimizer.scale_loss(loss)  # mixed_float16: LossScaleOptimizer
        model.optimizer.apply(tape.gradient(scaled, model.trainable_variables),
                              model.trainable_variables)
        return loss

    return model, ds.repeat(), lambda: step(*batch)


SOLVES = {"neumann": lambda: km.linalg.neumann(FLAGS.neumann_terms),
          "first_order": lambda: km.hypergrad.first_order()}


def meta_pt(xla, x, y_pt, y_ft, variant="neumann"):
    """A MetaPretrainer, its meta_dataset stream, and its compiled hyperstep on one element."""
    encoder, pt_head, ft_head = parts()
    model = km.MetaPretrainer(
        encoder, pt_head, ft_head, TaskWeights(FLAGS.pt_tasks),
        pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w), ft_loss=ft_loss,
        hyperstep_every=FLAGS.hyperstep_every, unroll_steps=FLAGS.unroll_steps,
        solve=SOLVES[variant](), warmup_steps=0)
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3),
                  keras.optimizers.Adam(1e-3), jit_compile=xla)

    def batched(*arrays):
        return tf.data.Dataset.from_tensor_slices(arrays).batch(FLAGS.batch, drop_remainder=True)

    stream = km.meta_dataset(batched(x, y_pt), batched(x[:1024], y_ft[:1024]),
                             batched(x[1024:2048], y_ft[1024:2048]), FLAGS.unroll_steps)
    element = next(iter(stream))
    hyperstep = tf.function(model._hyperstep, jit_compile=xla)
    return model, stream, lambda: hyperstep(element)


def epoch_ms(model, stream, timer):
    model.fit(stream, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0, callbacks=[timer])
    return 1e3 * timer.seconds[-1] / FLAGS.steps


def compare(xla, x, y_pt, y_ft, policy="float32"):
    """Rows (one per --hypersteps variant) of meta-PT against the same plain PT, alternated;
    every model built under the Keras dtype ``policy``."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        plain, plain_stream, plain_step = plain_pt(xla, x, y_pt)
        metas = {v: meta_pt(xla, x, y_pt, y_ft, v) for v in FLAGS.hypersteps}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    timers = {name: EpochTimer() for name in ["plain", *metas]}
    epoch_ms(plain, plain_stream, timers["plain"])  # warm-up: tracing and compilation
    for v, (model, stream, _) in metas.items():
        epoch_ms(model, stream, timers[v])
    plain_ms, meta_ms = [], {v: [] for v in metas}
    for _ in range(FLAGS.rounds):
        plain_ms.append(epoch_ms(plain, plain_stream, timers["plain"]))
        for v, (model, stream, _) in metas.items():
            meta_ms[v].append(epoch_ms(model, stream, timers[v]))
    plain_fn, hyper_fn = [], {v: [] for v in metas}
    for _ in range(3):  # alternate the function timings too
        plain_fn.append(function_ms(plain_step))
        for v, (_, _, hyperstep) in metas.items():
            hyper_fn[v].append(function_ms(hyperstep))
    rows = []
    for v in metas:
        ratios = np.array(meta_ms[v]) / np.array(plain_ms)
        rows.append({"xla": xla, "policy": policy, "hyperstep": v, "plain_pt_step_ms": float(np.median(plain_ms)),
                     "meta_pt_step_ms": float(np.median(meta_ms[v])),
                     "meta_over_plain": float(np.median(ratios)),
                     "meta_over_plain_per_round": ratios.tolist(),
                     "plain_pt_step_fn_ms": float(np.median(plain_fn)),
                     "hyperstep_fn_ms": float(np.median(hyper_fn[v])),
                     "hyperstep_over_plain_step": float(np.median(
                         np.array(hyper_fn[v]) / np.array(plain_fn)))})
    return rows


def call_to_host(fn):
    """fn(), its tensors brought to the host (so the call has finished)."""
    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())


def function_ms(fn):
    fn()  # tracing and compilation
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        call_to_host(fn)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


CONFIG_FLAGS = ("input_dim", "hidden", "pt_tasks", "ft_tasks", "batch", "hyperstep_every",
                "unroll_steps", "neumann_terms")


def held_child(what):
    """Peak MiB of the tensors the plain PT step (``what="plain"``) or the hyperstep of one
    variant holds at once, on its second call (run with TF_CPU_ALLOCATOR_USE_BFC=true)."""
    from benchmarks.memory import peak_requested_mib
    x, y_pt, y_ft = data()
    fn = plain_pt(False, x, y_pt)[2] if what == "plain" else meta_pt(False, x, y_pt, y_ft, what)[2]
    call_to_host(fn)  # traced and run once
    peak, _, _ = peak_requested_mib(lambda: call_to_host(fn))
    return peak


def held_mib(what):
    """``held_child(what)`` in a fresh process (the BFC allocator must be chosen before
    TensorFlow starts)."""
    cmd = [sys.executable, "-m", "benchmarks.meta_pt", f"--child={what}"]
    cmd += [f"--{name}={','.join(v) if isinstance(v, list) else v}"
            for name in CONFIG_FLAGS for v in [getattr(FLAGS, name)]]
    cmd += ["--quick"] if FLAGS.quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory of {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["held_mib"]


HYPERSTEP_NAMES = {"neumann": "Neumann", "first_order": "first order"}
# targets of the reference configuration: meta / plain, hyperstep / plain step, held / plain
TARGETS = {"neumann": (1.3, 4.0, None), "first_order": (1.15, 2.0, 1.1)}


def plot(result, path):
    """Three panels from a meta_pt.json: meta-PT / plain PT (bars: median; dots: rounds),
    hyperstep / plain step, and tensors held / plain step, each variant's target dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["policy"] == "float32"] or result["rows"]
    held = result.get("held_mib") or {}
    variants = [v for v in held if v != "plain"]
    kinds = [r["hyperstep"] for r in rows]
    modes = ["XLA" if r["xla"] else "tf.function" for r in rows]
    # per panel: (title, variants of the bars, their compilations, values, per-round dots)
    panels = [
        ("meta-PT / plain PT (fit)", kinds, modes, [r["meta_over_plain"] for r in rows],
         [r["meta_over_plain_per_round"] for r in rows]),
        ("hyperstep / plain PT step (functions)", kinds, modes,
         [r["hyperstep_over_plain_step"] for r in rows], None),
        ("tensors held / plain PT step (tf.function)", variants, [""] * len(variants),
         [held[v] / held["plain"] for v in variants], None)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for k, (ax, (title, kinds, modes, values, rounds)) in enumerate(zip(axes, panels)):
        x = np.arange(len(values))
        ax.bar(x, values, color=["C0" if v == "neumann" else "C1" for v in kinds])
        for i, v in enumerate(kinds):
            if rounds:
                ax.plot([i] * len(rounds[i]), rounds[i], "k.", ms=4)
            target = TARGETS.get(v, (None,) * 3)[k]
            if target:
                ax.hlines(target, i - 0.4, i + 0.4, colors="r", linestyles="--")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xticks=x, xticklabels=[f"{HYPERSTEP_NAMES.get(v, v)}\n{m}".strip()
                                      for v, m in zip(kinds, modes)],
               title=title, ylabel="ratio")
    fig.suptitle(f"MetaPretrainer cost ({result['config']}); red dashes: targets", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    if FLAGS.plot_only:
        with open(os.path.join(FLAGS.output_dir, "meta_pt.json")) as f:
            plot(json.load(f), os.path.join(FLAGS.output_dir, "meta_pt.png"))
        return
    if FLAGS.quick:
        FLAGS.input_dim, FLAGS.hidden, FLAGS.pt_tasks, FLAGS.ft_tasks = 16, ["32"], 20, 3
        # steps = N: every timed meta-PT epoch still holds exactly one hyperstep
        FLAGS.batch, FLAGS.steps, FLAGS.rounds, FLAGS.repeats = 16, 10, 1, 3
    if FLAGS.child:
        print(json.dumps({"held_mib": held_child(FLAGS.child)}))
        return
    x, y_pt, y_ft = data()
    rows = []
    unknown = [v for v in FLAGS.hypersteps if v not in SOLVES]
    if unknown or not FLAGS.hypersteps:
        raise app.UsageError(f"--hypersteps: give some of {', '.join(SOLVES)}")
    bad = [p for p in FLAGS.dtype_policies if p not in POLICIES]
    if bad or not FLAGS.dtype_policies:
        raise app.UsageError(f"--dtype_policies: give some of {', '.join(POLICIES)}")
    for policy, xla in [(p, xla) for p in FLAGS.dtype_policies for xla in (False, True)]:
        for row in compare(xla, x, y_pt, y_ft, policy):
            rows.append(row)
            print(f"  {policy} {'XLA' if xla else 'tf.function'} {row['hyperstep']}: plain "
                  f"{row['plain_pt_step_ms']:.2f} ms/step, meta {row['meta_pt_step_ms']:.2f} "
                  f"ms/step, per-round ratios "
                  f"{np.round(row['meta_over_plain_per_round'], 2).tolist()}", flush=True)
    config = (f"encoder {FLAGS.input_dim}-{'-'.join(FLAGS.hidden)}, PT head ->{FLAGS.pt_tasks} "
              f"tasks, FT head ->{FLAGS.ft_tasks}, batch {FLAGS.batch}, N={FLAGS.hyperstep_every}, "
              f"K={FLAGS.unroll_steps}, i={FLAGS.neumann_terms}, Adam")
    lines = ["## MetaPretrainer benchmark", "",
             f"`python -m benchmarks.meta_pt{' --quick' if FLAGS.quick else ''}`: {config}; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores.", "",
             "| dtype policy | compilation | hyperstep | plain PT step (fit) "
             "| meta-PT step (fit, avg) | meta / plain | hyperstep (fn) | plain PT step (fn) "
             "| hyperstep / plain step |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    names = {"neumann": f"Neumann i={FLAGS.neumann_terms} (exact IFT)",
             "first_order": "first order (SAMA)"}
    for r in rows:
        lines.append(f"| {r['policy']} | {'XLA' if r['xla'] else 'tf.function'} | "
                     f"{names[r['hyperstep']]} | "
                     f"{r['plain_pt_step_ms']:.2f} ms | "
                     f"{r['meta_pt_step_ms']:.2f} ms | {r['meta_over_plain']:.2f}x | "
                     f"{r['hyperstep_fn_ms']:.2f} ms | {r['plain_pt_step_fn_ms']:.2f} ms | "
                     f"{r['hyperstep_over_plain_step']:.2f}x |")
    held = {}
    if FLAGS.memory:
        held = {what: held_mib(what) for what in ["plain", *FLAGS.hypersteps]}
        lines += ["", "Tensors held at once (MiB; float32, tf.function, second call, a fresh "
                  "process each; weights and optimizer slots excluded):", "",
                  "| function | held MiB | / plain PT step |", "|---|---:|---:|",
                  f"| plain PT step | {held['plain']:.3f} | 1.00x |"]
        lines += [f"| hyperstep, {names[v]} | {held[v]:.3f} | {held[v] / held['plain']:.2f}x |"
                  for v in FLAGS.hypersteps]
    lines += ["", "Targets: meta / plain <= 1.3x (Neumann), <= 1.15x (first order); "
              "hyperstep / plain step <= 4x (Neumann), <= 2x (first order); first-order "
              "hyperstep memory <= 1.1x a plain PT step."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    result = {"config": config, "rows": rows, "held_mib": held, "quick": FLAGS.quick}
    runner.write_report(FLAGS.output_dir, "meta_pt", report, result)
    plot(result, os.path.join(FLAGS.output_dir, "meta_pt.png"))


if __name__ == "__main__":
    app.run(main)
