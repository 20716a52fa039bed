r"""Memory of hypergradients over long horizons: Unrolled against Forward and Reversible.

    python -m benchmarks.long_horizon_memory            # T = 10, 100, 1000 (about 6 minutes)
    python -m benchmarks.long_horizon_memory --quick    # tiny sizes, a smoke run

Problem: the reference MLP of benchmarks.hypergrad (64-256-256-10, batch 256, fixed random data)
with its learning rate shared over 4 blocks of the horizon (the 4 hyperparameters), T inner steps
of SGD with averaged momentum (`optim.ema_momentum_sgd`, v <- gamma v - (1 - gamma) g,
w <- w + lr v; gamma 0.9, and 0.99 for a second Reversible row). Methods:
- unrolled: `km.Unrolled` (backpropagation through the stored steps, O(T P));
- forward: `km.Forward` (tangents carried forward, one JVP per hyperparameter and step);
- reversible: `km.Reversible` (the steps undone exactly in fixed point; O(P) plus the
  information buffer, sum_t log2(1/gamma) bits per weight).
Each (method, T) runs --repeats times, each in a fresh subprocess with TensorFlow's counting
(BFC) CPU allocator (TF_CPU_ALLOCATOR_USE_BFC=true); the table gives the median and the range.
The function is traced first, then, during its first execution:
- "allocator": the BFC allocator's peak bytes in use above those in use before it. It counts
  whole chunks: a tensor placed in a free chunk less than twice its size is charged the whole
  chunk, so this figure moves by about 1 MiB with the order of earlier allocations;
- "resident": the peak resident memory above the resident memory before it (includes a
  first-execution overhead that does not depend on T).
A second execution runs under TensorFlow's profiler: "requested" is the largest sum of bytes
requested by the tensors it allocated and held at once (`benchmarks.memory.peak_requested_mib`),
what the computation holds without the allocator's padding. For Reversible the same process
then runs `reversal_check` and reports whether the run came back bit for bit, and the buffer's
size.

Writes benchmarks/results/long_horizon_memory.{md,json,png} (or --output_dir).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from benchmarks.memory import first_execution_peak_mib, peak_requested_mib  # noqa: E402
from benchmarks.reference_mlp import reference_problem  # noqa: E402
from keras_metapt import optim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("horizons", ["10", "100", "1000"], "Horizons T.")
flags.DEFINE_list("methods", ["unrolled", "forward", "reversible@0.9", "reversible@0.99"],
                  "Methods: unrolled, forward, reversible@GAMMA (gamma of the Reversible run; "
                  "unrolled and forward use gamma 0.9).")
flags.DEFINE_integer("blocks", 4, "Learning-rate blocks (the hyperparameters).")
flags.DEFINE_integer("repeats", 3, "Fresh processes per (method, T); the table gives the "
                     "median and the range.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where long_horizon_memory.md, .json and .png are written.")
flags.DEFINE_string("child", None, "Internal: run one 'method:T' measurement, print its JSON.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMMA = 0.9


def sizes():
    return ([16], 16) if FLAGS.quick else ([256, 256], 256)


def estimator(method, horizon):
    if method == "unrolled":
        return km.Unrolled(optim.ema_momentum_sgd(0.1, GAMMA), horizon)
    if method == "forward":
        return km.Forward(optim.ema_momentum_sgd(0.1, GAMMA), horizon)
    name, _, gamma = method.partition("@")
    if name != "reversible":
        raise ValueError(f"unknown method {method!r}: unrolled, forward or reversible@GAMMA")
    return km.Reversible(horizon, learning_rate=0.1, momentum=float(gamma or GAMMA))


def child(spec):
    method, horizon = spec.rsplit(":", 1)
    horizon = int(horizon)
    hidden, batch = sizes()
    _, problem, params, _, lrs, inner, outer = reference_problem(hidden, batch, FLAGS.blocks)
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))
    est = estimator(method, horizon)
    fn = tf.function(lambda p, h, b_in, b_out: est(problem, p, h, b_in, b_out).hypergrad)
    concrete = fn.get_concrete_function(params, lrs, inner, outer)  # traced, not run
    tf.config.experimental.reset_memory_stats("CPU:0")
    held_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start = time.perf_counter()
    resident, _, hypergrad = first_execution_peak_mib(
        lambda: concrete(params, lrs, inner, outer)[0].numpy())
    seconds = time.perf_counter() - start
    info = tf.config.experimental.get_memory_info("CPU:0")
    requested, _, _ = peak_requested_mib(lambda: concrete(params, lrs, inner, outer)[0].numpy())
    row = {"method": method, "T": horizon, "resident_mib": resident,
           "tensor_mib": (info["peak"] - held_before) / 2 ** 20, "requested_mib": requested,
           "seconds": seconds, "hypergrad": [float(x) for x in hypergrad]}
    if method.startswith("reversible"):
        check = tf.function(lambda p, h, b: est.reversal_check(problem, p, h, b))(
            params, lrs, inner)
        weights = sum(int(np.prod(p.shape)) for p in params)
        row.update(exact=bool(check.exact), buffer_bytes=int(check.buffer_bytes),
                   buffer_mib=int(check.buffer_bytes) * weights / 2 ** 20,
                   bits_per_weight=float(check.buffer_bits) / weights,
                   formula_bits_per_weight=float(check.expected_bits) / weights)
    print(json.dumps(row), flush=True)


def measure():
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    rows = []
    for method in FLAGS.methods:
        for horizon in FLAGS.horizons:
            cmd = [sys.executable, "-m", "benchmarks.long_horizon_memory",
                   f"--child={method}:{horizon}", f"--blocks={FLAGS.blocks}"]
            cmd += ["--quick"] if FLAGS.quick else []
            runs = []
            for _ in range(FLAGS.repeats):
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"{method} T={horizon} failed:\n{proc.stderr[-2000:]}")
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            row = median_row(runs)
            rows.append(row)
            print(f"  {method} T={horizon}: allocator {row['tensor_mib']:.1f} MiB, requested "
                  f"{row['requested_mib']:.1f} MiB, resident +{row['resident_mib']:.1f} MiB, "
                  f"{row['seconds']:.1f} s (medians of {len(runs)})", flush=True)
    return rows


MEASURED = ("tensor_mib", "requested_mib", "resident_mib", "seconds")


def median_row(runs):
    """The first run's row with each measured figure replaced by its median over the runs, and
    the runs' values kept under "<figure>_runs"; every run must agree on exactness."""
    row = dict(runs[0])
    for key in MEASURED:
        values = [r[key] for r in runs]
        row[key] = float(np.median(values))
        row[key + "_runs"] = values
    if "exact" in row:
        row["exact"] = all(r["exact"] for r in runs)
    return row


def spread(row, key):
    values = row.get(key + "_runs", [row[key]])
    return f"{row[key]:.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else (
        f"{row[key]:.1f}")


def report(rows, elapsed):
    hidden, batch = sizes()
    lines = ["## Long horizons: memory of Unrolled, Forward and Reversible", "",
             f"`python -m benchmarks.long_horizon_memory{' --quick' if FLAGS.quick else ''}`; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, {elapsed:.0f} s in all. "
             f"MLP 64-{'-'.join(map(str, hidden))}-10, batch {batch}, learning rate in {FLAGS.blocks} "
             f"blocks; medians (range) of {FLAGS.repeats} fresh processes; allocator and "
             "resident: first execution (BFC allocator); requested: peak bytes requested by the "
             "tensors of a profiled execution.", "",
             "| method | T | allocator (MiB) | vs smallest T | requested (MiB) | vs smallest T | "
             "resident (MiB) | vs smallest T | seconds | reversal exact | buffer bytes/weight | "
             "buffer (MiB) | bits/weight (formula) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for method in FLAGS.methods:
        sel = [r for r in rows if r["method"] == method]
        for r in sel:
            base = sel[0]
            extra = "| | | |"
            if "exact" in r:
                extra = (f"| {'yes' if r['exact'] else 'NO'} | {r['buffer_bytes']} | "
                         f"{r['buffer_mib']:.2f} | {r['bits_per_weight']:.1f} "
                         f"({r['formula_bits_per_weight']:.1f}) |")
            lines.append(
                f"| {method} | {r['T']} | {spread(r, 'tensor_mib')} | "
                f"{r['tensor_mib'] / base['tensor_mib']:.2f}x | {spread(r, 'requested_mib')} | "
                f"{r['requested_mib'] / base['requested_mib']:.2f}x | "
                f"{spread(r, 'resident_mib')} | "
                f"{r['resident_mib'] / max(base['resident_mib'], 1e-9):.2f}x | "
                f"{r['seconds']:.1f} {extra}")
    agree = []
    for horizon in FLAGS.horizons:
        ref = next((r for r in rows if r["method"] == "unrolled" and r["T"] == int(horizon)),
                   None)
        for r in rows:
            if ref is not None and r["T"] == int(horizon) and r["method"] in (
                    "forward", f"reversible@{GAMMA}"):
                a, b = np.array(r["hypergrad"]), np.array(ref["hypergrad"])
                agree.append(f"{r['method']} T={horizon}: "
                             f"{np.max(np.abs(a - b)) / np.max(np.abs(b)):.1e}")
    if agree:
        lines += ["", "Largest relative difference of the hypergradient from unrolled's (float32): "
                  + "; ".join(agree) + "."]
    lines += ["", "Target (long-horizon issue): forward and reversible peak memory at the long "
              "horizon within 1.2x of a 10-step horizon."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in FLAGS.methods:
        sel = [r for r in rows if r["method"] == method]
        ax.plot([r["T"] for r in sel], [r["tensor_mib"] for r in sel], "o-", label=method)
        ax.plot([r["T"] for r in sel], [r["requested_mib"] for r in sel], "x:",
                color=ax.lines[-1].get_color())
    ax.plot([], [], "k-", label="allocator (BFC peak in use)")
    ax.plot([], [], "kx:", label="requested by tensors")
    ax.set(xscale="log", yscale="log", xlabel="horizon T (inner steps)",
           ylabel="peak MiB (median of fresh processes)",
           title="Hypergradient memory against horizon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    if FLAGS.child:
        return child(FLAGS.child)
    start = time.perf_counter()
    rows = measure()
    text = report(rows, time.perf_counter() - start)
    print("\n" + text)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "long_horizon_memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(FLAGS.output_dir, "long_horizon_memory.json"), "w") as f:
        json.dump({"rows": rows, "quick": FLAGS.quick, "repeats": FLAGS.repeats,
                   "tensorflow": tf.__version__}, f, indent=1)
    plot(rows, os.path.join(FLAGS.output_dir, "long_horizon_memory.png"))
    print(f"Wrote {FLAGS.output_dir}/long_horizon_memory.md, .json, .png")


if __name__ == "__main__":
    app.run(main)
