r"""Hypergradient estimators: accuracy, time (with and without XLA) and memory.

    python -m benchmarks.hypergrad                      # full run (about 10 minutes on 2 cores)
    python -m benchmarks.hypergrad --quick              # tiny sizes, a smoke run

1. Accuracy: relative error ||g_hat - g|| / ||g|| of the implicit estimators against
   the closed-form ridge hypergradient (float64), per-feature log-penalties, d features.
2. Time per hypergradient on the reference problem (defaults kept so results compare
   with other libraries): MLP 64-256-256-10 (ReLU, softmax cross-entropy), inner SGD
   lr 0.1, batch 256 of fixed random data (seed 0), hyperparameters = 256 per-example
   loss weights sigmoid(logit), logits 0; reverse T=20; forward T=20 with the learning
   rate shared in 4 blocks (its hyperparameters are those 4 rates); Neumann 10 terms
   alpha 0.1; CG 10 iterations; EvoGrad K=2 sigma 1e-3 tau 0.05. Each estimator runs in
   tf.function with and without jit_compile in the same process; the median of
   --repeats calls after a warm-up call is reported.
3. Peak memory against the horizon T for reverse and forward mode: each (mode, T) runs
   in a fresh subprocess (TensorFlow keeps freed CPU memory pooled, so only a first
   execution shows its true need). The function is traced first (get_concrete_function,
   not executed), the kernel's peak-RSS counter is reset (/proc/self/clear_refs), and
   the figure is the peak resident memory during the first execution minus the resident
   memory just before it. It includes a constant first-execution overhead (graph
   optimisation, kernel set-up: about 35 MiB here) that does not depend on T.

Writes benchmarks/results/hypergrad.{md,json,png} (or --output_dir).
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
from keras_metapt import functional, linalg, optim  # noqa: E402
from tests import references  # noqa: E402
from keras_metapt.hyper import piecewise_constant  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("ridge_dims", ["100", "1000", "10000"], "Feature counts d for the ridge accuracy table.")
flags.DEFINE_integer("ridge_n", 1000, "Training examples in the ridge problem (validation: n/2).")
flags.DEFINE_integer("exact_max_dim", 1000, "Largest d for the dense (O(d^2) memory) exact solve.")
flags.DEFINE_integer("cg_iterations", 200, "CG iterations for the ridge accuracy table.")
flags.DEFINE_integer("neumann_terms", 200, "Neumann terms for the ridge accuracy table.")
flags.DEFINE_list("hidden", ["256", "256"], "Hidden widths of the reference MLP (input 64, output 10).")
flags.DEFINE_integer("batch", 256, "Batch size (= number of per-example weights).")
flags.DEFINE_integer("reverse_steps", 20, "Reverse-mode horizon T for the timing table.")
flags.DEFINE_integer("forward_steps", 20, "Forward-mode horizon T for the timing table.")
flags.DEFINE_integer("forward_blocks", 4, "Learning-rate blocks (hyperparameters) in forward mode.")
flags.DEFINE_integer("repeats", 5, "Timed calls per estimator and compilation mode (median).")
flags.DEFINE_list("horizons", ["10", "100", "1000"], "Horizons T for the memory table.")
flags.DEFINE_bool("quick", False, "Tiny sizes everywhere: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where hypergrad.md, hypergrad.json and hypergrad.png are written.")
flags.DEFINE_string("memory_child", None, "Internal: run one memory measurement 'mode:T' and "
                    "print its JSON (used by the subprocesses of part 3).")


# --------------------------------------------------------------------------- reference problem

TIMING_CG = linalg.cg(10, tolerance=0.0)  # the CG solver of the timing table

def reference_problem(hidden, batch, forward_blocks):
    """The MLP problem; returns (problem_for(kind), params, hparams_for(kind), inner, outer)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,))]
                             + [keras.layers.Dense(h, activation="relu") for h in hidden]
                             + [keras.layers.Dense(10)], name="reference_mlp")
    rng = np.random.default_rng(0)
    inner = (rng.normal(size=(batch, 64)).astype(np.float32), rng.integers(0, 10, batch))
    outer = (rng.normal(size=(batch, 64)).astype(np.float32), rng.integers(0, 10, batch))
    params, non_trainable = functional.model_state(model)

    def per_example(p, x, y):
        logits, _ = functional.stateless_apply(model, p, non_trainable, x)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    weighted = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(tf.sigmoid(h[0]) * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)))
    fixed_weights = tf.fill([batch], 0.5)
    schedule = km.BilevelProblem(
        inner_loss=lambda p, h, b: tf.reduce_mean(fixed_weights * per_example(p, *b)),
        outer_loss=lambda p, h, b: tf.reduce_mean(per_example(p, *b)),
        inner_optimizer_hparams=lambda h, t, T: {"learning_rate": piecewise_constant(h[0], t, T)})
    weight_logits = [tf.zeros([batch])]
    learning_rates = [tf.fill([forward_blocks], 0.1)]
    return weighted, schedule, params, weight_logits, learning_rates, inner, outer


def estimators():
    return {
        f"reverse T={FLAGS.reverse_steps}": ("weights", km.Unrolled(optim.sgd(0.1), FLAGS.reverse_steps)),
        f"reverse T={FLAGS.reverse_steps}, truncated K=1": (
            "weights", km.Unrolled(optim.sgd(0.1), FLAGS.reverse_steps, truncate=1)),
        f"forward T={FLAGS.forward_steps}, lr in {FLAGS.forward_blocks} blocks": (
            "schedule", km.Forward(optim.sgd(0.1), FLAGS.forward_steps)),
        "implicit Neumann i=10, alpha=0.1": ("weights", km.Implicit(linalg.neumann(10, alpha=0.1))),
        "implicit CG 10 iterations": ("weights", km.Implicit(TIMING_CG)),
        "EvoGrad K=2, sigma=1e-3, tau=0.05": (
            "weights", km.EvoGrad(num_copies=2, sigma=1e-3, temperature=0.05)),
    }


def median_seconds(fn, repeats):
    out = fn()  # warm-up: tracing and compilation
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timing_table():
    hidden = [int(h) for h in FLAGS.hidden]
    weighted, schedule, params, logits, lrs, inner, outer = reference_problem(
        hidden, FLAGS.batch, FLAGS.forward_blocks)
    rows = []
    # One inner gradient, as the unit of cost.
    # Batches are function arguments, as in training (captured constants could be folded by XLA).
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))

    def one_gradient(p, h, b):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = weighted.inner_loss(p, h, b)
        return tape.gradient(loss, p)
    unit = {}
    for xla in (False, True):
        fn = tf.function(one_gradient, jit_compile=xla)
        unit[xla] = median_seconds(lambda: fn(params, logits, inner), FLAGS.repeats)
    rows.append({"estimator": "one inner gradient (unit)", "ms_graph": 1e3 * unit[False],
                 "ms_xla": 1e3 * unit[True]})
    for name, (kind, est) in estimators().items():
        problem, hparams = (weighted, logits) if kind == "weights" else (schedule, lrs)
        row = {"estimator": name}
        for xla in (False, True):
            fn = tf.function(lambda p, h, b_in, b_out, est=est, problem=problem:
                             est(problem, p, h, b_in, b_out), jit_compile=xla)
            seconds = median_seconds(lambda: fn(params, hparams, inner, outer), FLAGS.repeats)
            row["ms_xla" if xla else "ms_graph"] = 1e3 * seconds
        row["gradients_graph"] = row["ms_graph"] / rows[0]["ms_graph"]
        if isinstance(est, km.Implicit) and est.solve == TIMING_CG:
            # CG stops early at non-positive curvature (the MLP's Hessian is indefinite here).
            _, ran = linalg.conjugate_gradient_with_info(
                lambda v: linalg.hvp(lambda p: problem.inner_loss(p, hparams, inner), params, v),
                params, TIMING_CG.max_iterations, TIMING_CG.tolerance)
            row["note"] = f"ran {int(ran)} of {TIMING_CG.max_iterations} CG iterations"
        rows.append(row)
        print(f"  timed {name}: {row['ms_graph']:.1f} ms graph, {row['ms_xla']:.1f} ms XLA", flush=True)
    for row in rows:
        row["speedup_xla"] = row["ms_graph"] / row["ms_xla"]
    return rows


# --------------------------------------------------------------------------- ridge accuracy

def ridge_table():
    rows = []
    for d in [int(v) for v in FLAGS.ridge_dims]:
        rng = np.random.default_rng(d)
        n = FLAGS.ridge_n
        x = rng.normal(size=(n, d))
        x_val = rng.normal(size=(n // 2, d))
        w_true = rng.normal(size=d) / np.sqrt(d)
        y = x @ w_true + 0.1 * rng.normal(size=n)
        y_val = x_val @ w_true + 0.1 * rng.normal(size=n // 2)
        log_lam = np.log(0.5) + 0.5 * rng.normal(size=d)
        start = time.perf_counter()
        truth, w_star = references.ridge_hypergradient(x, y, x_val, y_val, np.exp(log_lam))
        ref_seconds = time.perf_counter() - start
        # Neumann step alpha = 1 / (1.05 lambda_max(H)), lambda_max by 100 power iterations on
        # H v = X^T X v / n + lambda * v (matrix-free; converges from below, hence the margin).
        v = rng.normal(size=d)
        for _ in range(100):
            v = x.T @ (x @ v) / n + np.exp(log_lam) * v
            lam_max = np.linalg.norm(v)
            v /= lam_max
        alpha = 1.0 / (1.05 * lam_max)

        def inner_loss(p, h, b):
            xb, yb = b
            r = tf.linalg.matvec(xb, p[0]) - yb
            return tf.reduce_sum(r ** 2) / (2 * n) + 0.5 * tf.reduce_sum(tf.exp(h[0]) * p[0] ** 2)

        def outer_loss(p, h, b):
            xb, yb = b
            r = tf.linalg.matvec(xb, p[0]) - yb
            return tf.reduce_sum(r ** 2) / (2 * xb.shape[0])

        problem = km.BilevelProblem(inner_loss, outer_loss)
        candidates = {
            f"CG {FLAGS.cg_iterations} it": km.Implicit(linalg.cg(FLAGS.cg_iterations,
                                                                  tolerance=1e-12)),
            f"Neumann {FLAGS.neumann_terms} terms": km.Implicit(
                linalg.neumann(FLAGS.neumann_terms, alpha=alpha)),
        }
        if d <= FLAGS.exact_max_dim:
            candidates["exact (dense)"] = km.Implicit(linalg.dense())
        for name, est in candidates.items():
            # Data are arguments, not captured constants (XLA would constant-fold them).
            fn = tf.function(lambda p, h, b_in, b_out, est=est: est(problem, p, h, b_in, b_out),
                             jit_compile=True)
            start = time.perf_counter()
            result = fn([w_star], [log_lam], (x, y), (x_val, y_val))
            got = result.hypergrad[0].numpy()
            seconds = time.perf_counter() - start
            err = float(np.linalg.norm(got - truth) / np.linalg.norm(truth))
            rows.append({"d": d, "estimator": name, "relative_error": err, "seconds": seconds,
                         "closed_form_seconds": ref_seconds})
            print(f"  ridge d={d} {name}: relative error {err:.2e}", flush=True)
        if d > FLAGS.exact_max_dim:
            rows.append({"d": d, "estimator": "exact (dense)", "relative_error": None,
                         "seconds": None, "closed_form_seconds": ref_seconds,
                         "note": f"skipped: d > --exact_max_dim={FLAGS.exact_max_dim}"})
    return rows


# --------------------------------------------------------------------------- memory

def _rss_mib():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def memory_child(spec):
    """Runs inside a subprocess: one (mode, T) measurement, printed as JSON."""
    mode, horizon = spec.split(":")
    horizon = int(horizon)
    hidden = [int(h) for h in FLAGS.hidden]
    weighted, schedule, params, logits, lrs, inner, outer = reference_problem(
        hidden, FLAGS.batch, FLAGS.forward_blocks)
    if mode == "reverse":
        est, problem, hparams = km.Unrolled(optim.sgd(0.1), horizon), weighted, logits
    else:
        est, problem, hparams = km.Forward(optim.sgd(0.1), horizon), schedule, lrs
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))
    fn = tf.function(lambda p, h, b_in, b_out: est(problem, p, h, b_in, b_out).hypergrad)
    concrete = fn.get_concrete_function(params, hparams, inner, outer)  # traced, not run
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current size
    before = _rss_mib()["VmRSS"]
    start = time.perf_counter()
    concrete(params, hparams, inner, outer)[0].numpy()
    seconds = time.perf_counter() - start
    peak = _rss_mib()["VmHWM"]
    print(json.dumps({"mode": mode, "T": horizon, "peak_mib": peak - before,
                      "rss_before_mib": before, "seconds": seconds}))


def memory_table():
    rows = []
    env = dict(os.environ)
    for mode in ("reverse", "forward"):
        for horizon in [int(v) for v in FLAGS.horizons]:
            cmd = [sys.executable, "-m", "benchmarks.hypergrad", f"--memory_child={mode}:{horizon}",
                   f"--hidden={','.join(FLAGS.hidden)}", f"--batch={FLAGS.batch}",
                   f"--forward_blocks={FLAGS.forward_blocks}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if proc.returncode != 0:
                raise RuntimeError(f"memory run {mode} T={horizon} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  memory {mode} T={horizon}: peak +{row['peak_mib']:.1f} MiB "
                  f"({row['seconds']:.1f} s)", flush=True)
    return rows


# --------------------------------------------------------------------------- report

def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(ridge, timing, memory, elapsed):
    lines = ["## Hypergradient benchmark", "",
             f"`python -m benchmarks.hypergrad{' --quick' if FLAGS.quick else ''}`; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, {elapsed:.0f} s in all.", "",
             "### Accuracy on ridge regression (float64, per-feature log-penalties)", "",
             "| d | estimator | relative error vs closed form | seconds (incl. XLA compile) |",
             "|---:|---|---:|---:|"]
    for r in ridge:
        lines.append(f"| {r['d']} | {r['estimator']} | {fmt(r['relative_error'], '.1e')} | "
                     f"{fmt(r['seconds'], '.2f')}{' (' + r['note'] + ')' if r.get('note') else ''} |")
    lines += ["", "### Time per hypergradient, reference MLP problem (float32)", "",
              "| estimator | ms, tf.function | ms, XLA | XLA speed-up | cost in inner gradients |",
              "|---|---:|---:|---:|---:|"]
    for r in timing:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['estimator']}{note} | {r['ms_graph']:.2f} | {r['ms_xla']:.2f} | "
                     f"{r['speedup_xla']:.2f}x | {r.get('gradients_graph', 1.0):.1f} |")
    lines += ["", "### Peak memory against the horizon T (tf.function, float32)", "",
              "| mode | T | peak memory of the first execution (MiB) | seconds | vs smallest T |",
              "|---|---:|---:|---:|---:|"]
    for mode in ("reverse", "forward"):
        mode_rows = [r for r in memory if r["mode"] == mode]
        base = mode_rows[0]["peak_mib"] if mode_rows else None
        for r in mode_rows:
            lines.append(f"| {mode} | {r['T']} | {r['peak_mib']:.1f} | {r['seconds']:.1f} | "
                         f"{r['peak_mib'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(timing, memory, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for mode, marker in (("reverse", "o"), ("forward", "s")):
        rows = [r for r in memory if r["mode"] == mode]
        ax1.plot([r["T"] for r in rows], [max(r["peak_mib"], 1e-2) for r in rows], marker=marker,
                 label=f"{mode} mode")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("horizon T (inner steps)")
    ax1.set_ylabel("peak memory of the first execution (MiB)")
    ax1.set_title("Memory against horizon")
    ax1.legend()
    names = [r["estimator"] for r in timing]
    ypos = np.arange(len(names))
    ax2.barh(ypos - 0.2, [r["ms_graph"] for r in timing], 0.4, label="tf.function")
    ax2.barh(ypos + 0.2, [r["ms_xla"] for r in timing], 0.4, label="XLA")
    ax2.set_yticks(ypos, names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel("ms per hypergradient")
    ax2.set_title("Time, reference MLP problem")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # tf.function retracing notices: each config traces once
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return
    if FLAGS.quick:
        FLAGS.ridge_dims, FLAGS.ridge_n = ["20", "50"], 100
        FLAGS.cg_iterations, FLAGS.neumann_terms = 60, 60
        FLAGS.hidden, FLAGS.batch, FLAGS.repeats = ["16"], 16, 1
        FLAGS.reverse_steps, FLAGS.forward_steps, FLAGS.horizons = 4, 4, ["2", "8"]
    start = time.perf_counter()
    print("1/3 ridge accuracy", flush=True)
    ridge = ridge_table()
    print("2/3 time per hypergradient", flush=True)
    timing = timing_table()
    print("3/3 memory against horizon", flush=True)
    memory = memory_table()
    report = markdown(ridge, timing, memory, time.perf_counter() - start)
    print("\n" + report)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "hypergrad.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "hypergrad.json"), "w") as f:
        json.dump({"ridge": ridge, "timing": timing, "memory": memory,
                   "tensorflow": tf.__version__, "quick": FLAGS.quick}, f, indent=2)
    plot(timing, memory, os.path.join(FLAGS.output_dir, "hypergrad.png"))
    print(f"Wrote {FLAGS.output_dir}/hypergrad.md, hypergrad.json, hypergrad.png")


if __name__ == "__main__":
    app.run(main)
