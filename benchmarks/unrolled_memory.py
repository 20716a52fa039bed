r"""Unrolled hypergradients: peak memory and time of the two backward passes against K.

    python -m benchmarks.unrolled_memory            # K = 1, 4, 16, 64 on the MLP and a conv net
    python -m benchmarks.unrolled_memory --quick    # tiny sizes, a smoke run

`km.Unrolled(optim.sgd(0.1), K, backward=...)` differentiates K inner SGD steps of a
per-example-weighted loss (hyperparameters: one weight logit per training example):
- "reverse": reverse-over-reverse through the recorded `tf.while_loop`;
- "mixed": (theta_t) stored per step, each step rebuilt in the backward loop with its
  second-order products by forward-over-reverse.
Networks: the reference MLP of benchmarks.hypergrad (64-256-256-10, batch 256) and a conv net
(28x28x1 -> Conv 32 3x3 -> Conv 64 3x3 stride 2 -> Conv 64 3x3 stride 2 -> global average
pool -> Dense 10, ReLU, batch 64). Each (network, backward, K) runs in a fresh subprocess
(TensorFlow pools freed CPU memory): the function is traced, the kernel's peak-RSS counter is
reset, and the figure is the peak resident memory of the first execution minus the resident
memory before it (it includes a constant first-execution overhead). Time: median of --repeats
further calls in the same process (tf.function, no XLA). With --held (default), a second fresh
process per (network, backward, K) measures the tensors held at once during the second call
(`benchmarks.memory.peak_requested_mib`: bytes requested from TensorFlow's BFC allocator),
what the computation itself holds, without the runtime's first-execution overhead.

Writes benchmarks/results/unrolled_memory.{md,json,png} (or --output_dir).
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
from benchmarks.memory import first_execution_peak_mib, peak_requested_mib  # noqa: E402
from keras_metapt import functional, optim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("steps", ["1", "4", "16", "64"], "Horizons K (= T, untruncated).")
flags.DEFINE_list("nets", ["mlp", "conv"], "Networks: mlp, conv.")
flags.DEFINE_integer("repeats", 3, "Timed calls after the measured first one (median).")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_bool("held", True, "Also measure the tensors held at once (BFC allocator's "
                  "requested bytes, second call, a fresh process each).")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where unrolled_memory.md, .json and .png are written.")
flags.DEFINE_string("child", None, "Internal: run one 'net:backward:K' measurement and print "
                    "its JSON.")

BACKWARDS = ("reverse", "mixed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def network(name, quick):
    """(model, input shape, batch) of a network, seeded."""
    keras.utils.set_random_seed(0)
    if name == "mlp":
        widths = [32, 32] if quick else [256, 256]
        layers = [keras.Input((64,))] + [keras.layers.Dense(w, activation="relu") for w in widths]
        return keras.Sequential(layers + [keras.layers.Dense(10)]), (64,), 16 if quick else 256
    channels = (4, 8, 8) if quick else (32, 64, 64)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(channels[0], 3, padding="same", activation="relu"),
        keras.layers.Conv2D(channels[1], 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(channels[2], 3, strides=2, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    return model, (28, 28, 1), 8 if quick else 64


def weighted_problem(model, shape, batch):
    """Per-example-weighted cross-entropy; returns (problem, params, [logits], inner, outer)."""
    rng = np.random.default_rng(0)
    inner = (rng.normal(size=(batch,) + shape).astype(np.float32), rng.integers(0, 10, batch))
    outer = (rng.normal(size=(batch,) + shape).astype(np.float32), rng.integers(0, 10, batch))
    params, non_trainable = functional.model_state(model)

    def per_example(p, x, y):
        logits, _ = functional.stateless_apply(model, p, non_trainable, x)
        return -tf.reduce_sum(tf.one_hot(y, 10) * tf.nn.log_softmax(logits), -1)

    problem = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(tf.sigmoid(h[0]) * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)))
    return problem, params, [tf.zeros([batch])], inner, outer


def child(spec):
    """One (net, backward, K) measurement in this process, printed as JSON; with a fourth
    field "held" (run under TF_CPU_ALLOCATOR_USE_BFC=true), the tensors held instead."""
    net, backward, steps, *held = spec.split(":")
    model, shape, batch = network(net, FLAGS.quick)
    problem, params, hparams, inner, outer = weighted_problem(model, shape, batch)
    estimator = km.Unrolled(optim.sgd(0.1), int(steps), backward=backward)
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))
    fn = tf.function(lambda p, h, b_in, b_out: estimator(problem, p, h, b_in, b_out).hypergrad)
    concrete = fn.get_concrete_function(params, hparams, inner, outer)  # traced, not run
    if held:
        concrete(params, hparams, inner, outer)[0].numpy()  # first execution
        mib = peak_requested_mib(lambda: concrete(params, hparams, inner, outer)[0].numpy())[0]
        print(json.dumps({"held_mib": mib}))
        return
    peak, _, first = first_execution_peak_mib(
        lambda: concrete(params, hparams, inner, outer)[0].numpy())
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        concrete(params, hparams, inner, outer)[0].numpy()
        times.append(time.perf_counter() - start)
    print(json.dumps({"net": net, "backward": backward, "K": int(steps),
                      "peak_mib": peak, "ms": 1e3 * float(np.median(times)),
                      "hypergrad_norm": float(np.linalg.norm(first))}))


def measure():
    rows = []
    for net in FLAGS.nets:
        for steps in FLAGS.steps:
            for backward in BACKWARDS:
                row = run_child(f"{net}:{backward}:{steps}")
                if FLAGS.held:
                    row.update(run_child(f"{net}:{backward}:{steps}:held",
                                         TF_CPU_ALLOCATOR_USE_BFC="true"))
                rows.append(row)
                print(f"  {net} K={steps} {backward}: peak +{row['peak_mib']:.1f} MiB, "
                      f"{row['ms']:.1f} ms"
                      + (f", held {row['held_mib']:.1f} MiB" if FLAGS.held else ""), flush=True)
    return rows


def run_child(spec, **env):
    """The JSON a --child run of ``spec`` prints, from a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.unrolled_memory", f"--child={spec}",
           f"--repeats={FLAGS.repeats}"] + (["--quick"] if FLAGS.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows):
    lines = ["## Unrolled backward: reverse-over-reverse against mixed mode", "",
             f"`python -m benchmarks.unrolled_memory{' --quick' if FLAGS.quick else ''}`; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; peak memory of the first "
             "execution (MiB, fresh process each), time per hypergradient (ms, tf.function)"
             + ("; tensors held at once (MiB, BFC allocator, second call, fresh process each)"
                if FLAGS.held else "") + ".", "",
             "| network | K | reverse MiB | mixed MiB | mixed / reverse memory | reverse ms "
             "| mixed ms | mixed / reverse time | same hypergradient |"
             + (" reverse held MiB | mixed held MiB | mixed / reverse held |" if FLAGS.held
                else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|" if FLAGS.held
                                                              else "")]
    for net in FLAGS.nets:
        for steps in FLAGS.steps:
            r, m = [next(x for x in rows if x["net"] == net and x["K"] == int(steps)
                         and x["backward"] == b) for b in BACKWARDS]
            same = abs(r["hypergrad_norm"] - m["hypergrad_norm"]) <= 1e-4 * r["hypergrad_norm"]
            lines.append(f"| {net} | {steps} | {r['peak_mib']:.1f} | {m['peak_mib']:.1f} | "
                         f"{m['peak_mib'] / r['peak_mib']:.2f}x | {r['ms']:.1f} | {m['ms']:.1f} | "
                         f"{m['ms'] / r['ms']:.2f}x | {'yes' if same else 'NO'} (norms) |"
                         + (f" {r['held_mib']:.1f} | {m['held_mib']:.1f} | "
                            f"{m['held_mib'] / r['held_mib']:.2f}x |" if FLAGS.held else ""))
    lines += ["", "Targets at K=64: mixed peak memory <= 0.5x reverse, time <= 1.3x."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(FLAGS.nets), figsize=(5 * len(FLAGS.nets), 3.6), squeeze=False)
    for ax, net in zip(axes[0], FLAGS.nets):
        for backward in BACKWARDS:
            sel = [x for x in rows if x["net"] == net and x["backward"] == backward]
            ax.plot([x["K"] for x in sel], [x["peak_mib"] for x in sel], "o-", label=backward)
        ax.set(xscale="log", xlabel="K (differentiated steps)", ylabel="peak memory (MiB)",
               title=net)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    if FLAGS.child:
        return child(FLAGS.child)
    rows = measure()
    text = report(rows)
    print("\n" + text)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "unrolled_memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(FLAGS.output_dir, "unrolled_memory.json"), "w") as f:
        json.dump({"rows": rows, "quick": FLAGS.quick}, f, indent=1)
    plot(rows, os.path.join(FLAGS.output_dir, "unrolled_memory.png"))


if __name__ == "__main__":
    app.run(main)
