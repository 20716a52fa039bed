r"""Task-family meta-learners: peak memory and time of one meta-step against the inner
horizon T.

    python -m benchmarks.task_meta_memory            # T = 5, 20, 80 on the Fashion-MNIST-size learner
    python -m benchmarks.task_meta_memory --quick    # tiny sizes, a smoke run

Learner: the conv classifier of the task meta-learning app (keras_metapt.km.taskmeta.classifier:
4 blocks of conv 3x3 -> batch norm -> ReLU -> max-pool, width 32, on 28x28x1 images; --quick:
2 blocks, width 4, 8x8), 5-way tasks with 5 support and 15 query images per class, a
meta-batch of 2 tasks, T inner SGD steps on the support set. Methods: second-order MAML with
`Unrolled`'s reverse-over-reverse backward ("maml") and its mixed-mode one ("maml_mixed"),
first-order MAML, Reptile, ARUBA, Continual Trajectory Shifting (an initialisation update
after every inner step) and WarpGrad (warp layers after every block; 5 buffered points per
task whatever T, one warp step per point, the second step on the query set). Each (method, T) runs in a fresh subprocess (TensorFlow pools freed
CPU memory): the meta-step is traced, the kernel's peak-RSS counter reset, and the figure is
the peak resident memory of the first meta-step minus the resident memory before it
(`benchmarks.memory`). Time: median of --repeats further meta-steps (tf.function, no XLA).
The claim measured: the first-order methods' memory is flat in T (no backpropagation through
adaptation); second-order MAML's grows with T.

Writes benchmarks/results/task_meta_memory.{md,json,png} (or --output_dir).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from benchmarks.memory import first_execution_peak_mib  # noqa: E402

FLAGS = flags.FLAGS
METHODS = ("maml", "maml_mixed", "fomaml", "reptile", "aruba", "cts", "warpgrad")
WARPGRAD_POINTS = 5  # buffered trajectory points per task, fixed as T grows
flags.DEFINE_list("steps", ["5", "20", "80"], "Inner horizons T.")
flags.DEFINE_list("methods", list(METHODS), "Methods, out of " + ", ".join(METHODS) + ".")
flags.DEFINE_integer("repeats", 3, "Timed meta-steps after the measured first one (median).")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where task_meta_memory.md, .json and .png are written.")
flags.DEFINE_string("child", None, "Internal: run one 'method:T' measurement and print its "
                    "JSON.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_WAY, K_SHOT, N_QUERY, META_BATCH = 5, 5, 15, 2


def learner(method, steps, quick):
    shape, width, blocks = ((8, 8, 1), 4, 2) if quick else ((28, 28, 1), 32, 4)
    params = km.taskmeta.conv_classifier_params(N_WAY, shape, width=width, blocks=blocks, seed=0)
    loss, common = km.taskmeta.classification_loss, dict(inner_steps=steps, inner_learning_rate=0.05)
    if method.startswith("maml") or method == "fomaml":
        return km.taskmeta.MAML(loss, params, meta_optimizer=keras.optimizers.SGD(1e-3),
                             first_order=method == "fomaml",
                             backward="mixed" if method == "maml_mixed" else "reverse",
                             **common), shape
    if method == "reptile":
        return km.taskmeta.Reptile(loss, params, **common), shape
    if method == "aruba":
        return km.taskmeta.ARUBA(loss, params, **common), shape
    if method == "warpgrad":
        return km.taskmeta.WarpGrad(
            km.taskmeta.warped_classification_loss, params,
            km.taskmeta.identity_warp_params(width, blocks), init_learning_rate=0.01,
            trajectory_points=WARPGRAD_POINTS, **common), shape
    return km.taskmeta.ContinualTrajectoryShifting(loss, params, meta_step_size=0.01,
                                                **common), shape


def child(spec):
    """One (method, T) measurement in this process, printed as JSON."""
    method, steps = spec.split(":")
    meta, shape = learner(method, int(steps), FLAGS.quick)
    rng = np.random.default_rng(0)
    support = (tf.constant(rng.random((META_BATCH, N_WAY * K_SHOT) + shape, np.float32)),
               tf.constant(np.tile(np.repeat(np.arange(N_WAY), K_SHOT), (META_BATCH, 1))))
    query = (tf.constant(rng.random((META_BATCH, N_WAY * N_QUERY) + shape, np.float32)),
             tf.constant(np.tile(np.repeat(np.arange(N_WAY), N_QUERY), (META_BATCH, 1))))
    weights = tf.constant(np.full(META_BATCH, 1.0 / META_BATCH), tf.float64)
    meta._meta_update.get_concrete_function(support, query, weights, False)  # traced, not run

    def meta_step():
        return float(next(iter(meta._meta_update(support, query, weights, False).values())))
    peak, _, _ = first_execution_peak_mib(meta_step)
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        meta_step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"method": method, "T": int(steps), "peak_mib": peak,
                      "ms": 1e3 * float(np.median(times))}))


def measure():
    rows = []
    for steps in FLAGS.steps:
        for method in FLAGS.methods:
            cmd = [sys.executable, "-m", "benchmarks.task_meta_memory",
                   f"--child={method}:{steps}", f"--repeats={FLAGS.repeats}"]
            cmd += ["--quick"] if FLAGS.quick else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} T={steps} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  T={steps} {method}: peak +{row['peak_mib']:.1f} MiB, {row['ms']:.1f} ms "
                  "per meta-step", flush=True)
    return rows


def report(rows):
    steps = sorted({r["T"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    cell = {(r["method"], r["T"]): r for r in rows}
    lines = ["## Task-family meta-learners: one meta-step against the inner horizon T", "",
             f"`python -m benchmarks.task_meta_memory{' --quick' if FLAGS.quick else ''}`; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; peak memory of the "
             "first meta-step (MiB above the resident memory before it, fresh process each) "
             f"and time per meta-step (ms, median of {FLAGS.repeats}); {N_WAY}-way "
             f"{K_SHOT}-shot, {N_QUERY} queries per class, {META_BATCH} tasks per meta-step.",
             "", "| method | " + " | ".join(f"T={t} MiB | T={t} ms" for t in steps) + " |",
             "|---" + "|---:|---:" * len(steps) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{cell[(m, t)]['peak_mib']:.1f} | {cell[(m, t)]['ms']:.1f}" if (m, t) in cell
            else "- | -" for t in steps) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["T"])
        if mine:
            left.plot([r["T"] for r in mine], [r["peak_mib"] for r in mine], "o-", label=m)
            right.plot([r["T"] for r in mine], [r["ms"] for r in mine], "o-", label=m)
    left.set(xlabel="inner steps T", ylabel="peak MiB (first meta-step)", xscale="log")
    right.set(xlabel="inner steps T", ylabel="ms per meta-step", xscale="log", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.child:
        return child(FLAGS.child)
    unknown = sorted(set(FLAGS.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    rows = measure()
    table = report(rows)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "task_meta_memory.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.output_dir, "task_meta_memory.json"), "w") as f:
        json.dump({"rows": rows, "quick": FLAGS.quick}, f, indent=1)
    plot(rows, os.path.join(FLAGS.output_dir, "task_meta_memory.png"))
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
