r"""Hypergradient estimators: accuracy, time (with and without XLA) and memory.

    python -m benchmarks.hypergrad                      # full run (about 10 minutes on 2 cores)
    python -m benchmarks.hypergrad --quick              # tiny sizes, a smoke run
    python -m benchmarks.hypergrad --timing_only        # part 2 only (hypergrad_timing.*)

1. Accuracy: relative error ||g_hat - g|| / ||g|| of the implicit estimators against
   the closed-form ridge hypergradient (float64), per-feature log-penalties, d features.
2. Time per hypergradient on the reference problem (defaults kept so results compare
   with other libraries): MLP 64-256-256-10 (ReLU, softmax cross-entropy), inner SGD
   lr 0.1, batch 256 of fixed random data (seed 0), hyperparameters = 256 per-example
   loss weights sigmoid(logit), logits 0; reverse T=20; forward T=20 with the learning
   rate shared in 4 blocks (its hyperparameters are those 4 rates); Neumann 10 terms
   alpha 0.1; CG at most 10 iterations, stopping at the first direction of non-positive
   curvature (the default), and CG with a fixed count of 10 iterations (no curvature stop,
   as libraries without that check run it); each CG row is labelled with the iterations it
   ran on this problem (same right-hand side and HVP as the estimator); EvoGrad K=2 sigma
   1e-3 tau 0.05. Each estimator runs in tf.function with and without jit_compile in the
   same process; the median of --repeats calls after a warm-up call is reported. Then the
   fixed cost of a call, what does not grow with the problem: each estimator at its smallest
   setting (T=1, one term or iteration, K=2) on a problem of one weight, a no-op taking
   the reference problem's argument tensors (the binding), and each estimator on the
   reference problem's own argument tensors with losses that read one weight (the whole
   fixed cost there, as one figure), through tf.function, through the concrete function and
   through `km.hypergrad.compile_hypergradient`.
3. Peak memory against the horizon T for reverse and forward mode: each (mode, T) runs
   in a fresh subprocess (TensorFlow keeps freed CPU memory pooled, so only a first
   execution shows its true need). The function is traced first (get_concrete_function,
   not executed), the kernel's peak-RSS counter is reset (/proc/self/clear_refs), and
   the figure is the peak resident memory during the first execution minus the resident
   memory just before it (`benchmarks.memory.first_execution_peak_mib`). It includes a first-execution overhead (graph optimisation,
   kernel set-up, allocator pools) that does not depend on T. To separate tensors from that
   overhead, every (mode, T) runs again in one more subprocess with TensorFlow's CPU
   allocator switched to its BFC allocator (TF_CPU_ALLOCATOR_USE_BFC=true), which counts
   bytes (exactly, so one process serves all T): the "tensors" column is the peak of bytes
   held in tensors during the first execution, above those held before it
   (--nocount_tensors skips it; --quick too).

Writes benchmarks/results/hypergrad.{md,json,png} (or --output_dir). --timing_only (or empty
--ridge_dims and --horizons) skips parts 1 and 3, their tables and the memory plot; with
--timing_only the files are hypergrad_timing.{md,json,png}, so a timing run does not
overwrite a full one.
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
from keras_metapt import linalg, optim  # noqa: E402
from tests import references  # noqa: E402
from benchmarks.memory import first_execution_peak_mib  # noqa: E402
from benchmarks.reference_mlp import reference_problem  # noqa: E402

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
flags.DEFINE_bool("count_tensors", True, "Also count the bytes held in tensors per (mode, T) "
                  "(one more subprocess, with the BFC allocator); --quick turns it off.")
flags.DEFINE_bool("quick", False, "Tiny sizes everywhere: a smoke run, not a measurement.")
flags.DEFINE_bool("timing_only", False, "Only the timing table (part 2): skips the ridge "
                  "accuracy and memory sweeps and the memory plot; writes hypergrad_timing.*.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where hypergrad.md, hypergrad.json and hypergrad.png are written.")
flags.DEFINE_string("memory_child", None, "Internal: run the memory measurements "
                    "'mode:T[,mode:T...]' and print their JSON (the subprocesses of part 3).")


# --------------------------------------------------------------------------- reference problem

# The CG solvers of the timing table: the default (stops at non-positive curvature) and a
# fixed count of 10 iterations. tolerance=0: no stop on the residual.
TIMING_CG = linalg.cg(10, tolerance=0.0)
TIMING_CG_FIXED = linalg.cg(10, tolerance=0.0, stop_on_negative_curvature=False)

def estimators():
    return {
        f"reverse T={FLAGS.reverse_steps}": ("weights", km.Unrolled(optim.sgd(0.1), FLAGS.reverse_steps)),
        f"reverse T={FLAGS.reverse_steps}, truncated K=1": (
            "weights", km.Unrolled(optim.sgd(0.1), FLAGS.reverse_steps, truncate=1)),
        f"forward T={FLAGS.forward_steps}, lr in {FLAGS.forward_blocks} blocks": (
            "schedule", km.Forward(optim.sgd(0.1), FLAGS.forward_steps)),
        "implicit Neumann i=10, alpha=0.1": ("weights", km.Implicit(linalg.neumann(10, alpha=0.1))),
        "implicit CG": ("weights", km.Implicit(TIMING_CG)),
        "implicit CG, fixed count": ("weights", km.Implicit(TIMING_CG_FIXED)),
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


def cg_iterations_run(solver, problem, params, hparams, inner, outer):
    """The CG iterations (HVPs) ``km.Implicit(solver)`` runs on this problem: the same
    right-hand side (d outer / d theta) and HVP (reverse-over-reverse, inner loss)."""
    @tf.function
    def count(p, h, b_in, b_out):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = problem.outer_loss(p, h, b_out)
        rhs = tape.gradient(loss, p)
        return solver.solve_with_info(
            lambda v: linalg.hvp(lambda q: problem.inner_loss(q, h, b_in), p, v), rhs)[1]
    return int(count(params, hparams, inner, outer))


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
        if isinstance(est, km.Implicit) and isinstance(est.solve, linalg.CGSolver):
            ran = cg_iterations_run(est.solve, problem, params, hparams, inner, outer)
            row.update(cg_iterations_run=ran, cg_max_iterations=est.solve.max_iterations,
                       cg_stop_on_negative_curvature=est.solve.stop_on_negative_curvature)
            if est.solve.stop_on_negative_curvature:
                row["estimator"] = (f"implicit CG stopping at curvature <= 0: {ran} of at most "
                                    f"{est.solve.max_iterations} iterations run")
            else:
                row["estimator"] = (f"implicit CG, fixed count: {ran} of "
                                    f"{est.solve.max_iterations} iterations run")
        for xla in (False, True):
            fn = tf.function(lambda p, h, b_in, b_out, est=est, problem=problem:
                             est(problem, p, h, b_in, b_out), jit_compile=xla)
            seconds = median_seconds(lambda: fn(params, hparams, inner, outer), FLAGS.repeats)
            row["ms_xla" if xla else "ms_graph"] = 1e3 * seconds
        row["gradients_graph"] = row["ms_graph"] / rows[0]["ms_graph"]
        rows.append(row)
        print(f"  timed {row['estimator']}: {row['ms_graph']:.1f} ms graph, "
              f"{row['ms_xla']:.1f} ms XLA", flush=True)
    for row in rows:
        row["speedup_xla"] = row["ms_graph"] / row["ms_xla"]
    return rows


# --------------------------------------------------------------------------- fixed cost

def ms_per_call(fn, calls, repeats):
    """Median over ``repeats`` rounds of the mean time of ``calls`` calls in a row (ms)."""
    out = fn()  # warm-up: tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(times))


def fixed_cost_table():
    """What a call costs whatever the problem: the estimators at their smallest settings on a
    problem of one weight and one hyperparameter (inner (w - h)^2 / 2, outer (w - y)^2 / 2),
    and a function that does nothing but take the reference problem's arguments (binding).
    Each through tf.function (the usual call) and through its concrete function."""
    calls, repeats = (20, 1) if FLAGS.quick else (300, 7)
    problem = km.BilevelProblem(lambda p, h, b: 0.5 * tf.reduce_sum(tf.square(p[0] - h[0])),
                                lambda p, h, b: 0.5 * tf.reduce_sum(tf.square(p[0] - b)))
    args = ([tf.constant([1.0])], [tf.constant([0.5])], tf.constant([0.0]), tf.constant([0.0]))
    _, _, params, logits, learning_rates, inner, outer = reference_problem(
        [int(h) for h in FLAGS.hidden], FLAGS.batch, FLAGS.forward_blocks)
    reference_args = (params, logits) + tf.nest.map_structure(tf.constant, (inner, outer))
    tiny = {
        "reverse T=1": km.Unrolled(optim.sgd(0.1), 1),
        "forward T=1": km.Forward(optim.sgd(0.1), 1),
        "implicit Neumann i=1": km.Implicit(linalg.neumann(1, alpha=0.1)),
        "implicit CG, 1 iteration": km.Implicit(linalg.cg(1, tolerance=0.0)),
        "EvoGrad K=2": km.EvoGrad(num_copies=2, sigma=1e-3, temperature=0.05),
    }
    cases = [(f"no-op taking the reference problem's {len(tf.nest.flatten(reference_args))} "
              "argument tensors (binding)", lambda p, h, b_in, b_out: tf.constant(0.0),
              reference_args)]

    def hypergradient(est, on=problem):  # the estimator in a closure: only tensors in the signature
        return lambda p, h, b_in, b_out: est(on, p, h, b_in, b_out).hypergrad

    cases += [(f"{name}, one weight", hypergradient(est), args, km.hypergrad.compile_hypergradient(
        est, problem)) for name, est in tiny.items()]
    cases[0] += (km.hypergrad.compile_hypergradient(_ArgumentsOnly(), problem),)
    # The same estimators on the reference problem's own argument tensors, with losses that
    # read one weight of them: the whole fixed cost of a call there, measured as one figure.
    one_weight_losses = km.BilevelProblem(
        lambda p, h, b: 0.5 * tf.square(p[0][0, 0] - h[0][0]),
        lambda p, h, b: 0.5 * tf.square(p[0][0, 0] - b[0][0, 0]))
    schedule_losses = km.BilevelProblem(
        lambda p, h, b: 0.5 * tf.square(p[0][0, 0] - b[0][0, 0]), one_weight_losses.outer_loss,
        inner_optimizer_hparams=lambda h, t, T: {"learning_rate": h[0][0]})
    for name, est in tiny.items():
        on_schedule = name.startswith("forward")
        use = schedule_losses if on_schedule else one_weight_losses
        call_args = ((params, learning_rates) if on_schedule else (params, logits)) + \
            reference_args[2:]
        cases.append((f"{name}, the reference problem's {len(tf.nest.flatten(call_args))} "
                      "argument tensors, losses of one weight", hypergradient(est, use), call_args,
                      km.hypergrad.compile_hypergradient(est, use)))
    rows = []
    for name, body, call_args, compiled_call in cases:
        fn = tf.function(body)
        concrete = fn.get_concrete_function(*call_args)
        rows.append({"call": name,
                     "ms_function": ms_per_call(lambda: fn(*call_args), calls, repeats),
                     "ms_concrete": ms_per_call(lambda: concrete(*call_args), calls, repeats),
                     "ms_compiled": ms_per_call(lambda: compiled_call(*call_args).hypergrad,
                                                calls, repeats)})
        print(f"  fixed cost {name}: {rows[-1]['ms_function']:.3f} ms (tf.function), "
              f"{rows[-1]['ms_compiled']:.3f} ms (compile_hypergradient)", flush=True)
    return rows


class _ArgumentsOnly(km.hypergrad.Estimator):
    """Takes an estimator's arguments and returns a constant: the call path alone."""

    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        zero = tf.constant(0.0)
        return km.HypergradResult(zero, zero, zero, zero, zero, (), tf.constant(True))


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

def _hypergrad_fn(est, problem):
    return tf.function(lambda p, h, b_in, b_out: est(problem, p, h, b_in, b_out).hypergrad)


def memory_child(specs):
    """Runs inside a subprocess: (mode, T) measurements 'mode:T,...', one JSON line each.

    Resident memory is read for the first spec only (TensorFlow keeps freed CPU memory
    pooled, so later executions in the same process understate it). Tensor bytes (with
    TF_CPU_ALLOCATOR_USE_BFC=true) are counted exactly for every spec.
    """
    hidden = [int(h) for h in FLAGS.hidden]
    weighted, schedule, params, logits, lrs, inner, outer = reference_problem(
        hidden, FLAGS.batch, FLAGS.forward_blocks)
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))
    counting = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true"  # tensors are counted
    for index, spec in enumerate(specs.split(",")):
        mode, horizon = spec.split(":")
        horizon = int(horizon)
        if mode == "reverse":
            est, problem, hparams = km.Unrolled(optim.sgd(0.1), horizon), weighted, logits
        else:
            est, problem, hparams = km.Forward(optim.sgd(0.1), horizon), schedule, lrs
        concrete = _hypergrad_fn(est, problem).get_concrete_function(
            params, hparams, inner, outer)  # traced, not run
        if counting:
            tf.config.experimental.reset_memory_stats("CPU:0")
            held_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        start = time.perf_counter()
        peak, before, _ = first_execution_peak_mib(
            lambda: concrete(params, hparams, inner, outer)[0].numpy())
        seconds = time.perf_counter() - start
        out = {"mode": mode, "T": horizon, "seconds": seconds,
               "graph_nodes": len(concrete.graph.as_graph_def().node)}
        if index == 0:
            out.update(peak_mib=peak, rss_before_mib=before)
        if counting:
            info = tf.config.experimental.get_memory_info("CPU:0")
            out["tensor_peak_mib"] = (info["peak"] - held_before) / 2 ** 20
        print(json.dumps(out), flush=True)


def _memory_runs(specs, count_tensors):
    env = dict(os.environ)
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if count_tensors:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    cmd = [sys.executable, "-m", "benchmarks.hypergrad", f"--memory_child={','.join(specs)}",
           f"--hidden={','.join(FLAGS.hidden)}", f"--batch={FLAGS.batch}",
           f"--forward_blocks={FLAGS.forward_blocks}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {specs} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(specs):]]


def memory_table():
    """Resident memory: one fresh process per (mode, T), default allocator. Tensors: one
    process with the counting (BFC) allocator for all of them."""
    specs = [f"{mode}:{horizon}" for mode in ("reverse", "forward")
             for horizon in [int(v) for v in FLAGS.horizons]]
    if not specs:
        return []
    if FLAGS.quick:  # a smoke run: every spec in one process, resident memory of the first only
        rows = _memory_runs(specs, count_tensors=False)
        for row in rows:
            row.setdefault("peak_mib", None)
        return rows
    rows = []
    for spec in specs:
        row, = _memory_runs([spec], count_tensors=False)
        rows.append(row)
        print(f"  memory {spec}: peak +{row['peak_mib']:.1f} MiB resident "
              f"({row['seconds']:.1f} s)", flush=True)
    for row, counted in zip(rows, _memory_runs(specs, count_tensors=True)
                            if FLAGS.count_tensors else []):
        assert (row["mode"], row["T"]) == (counted["mode"], counted["T"])
        row["tensor_peak_mib"] = counted["tensor_peak_mib"]
        print(f"  memory {row['mode']}:{row['T']}: {row['tensor_peak_mib']:.1f} MiB in tensors",
              flush=True)
    return rows


# --------------------------------------------------------------------------- report

def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def command_line():
    return " ".join(["python -m benchmarks.hypergrad"]
                    + [f for f, on in (("--quick", FLAGS.quick),
                                       ("--timing_only", FLAGS.timing_only)) if on])


def markdown(ridge, timing, memory, elapsed, fixed_cost=()):
    lines = ["## Hypergradient benchmark", "",
             f"`{command_line()}`; "
             f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, {elapsed:.0f} s in all."]
    if ridge:
        lines += ["", "### Accuracy on ridge regression (float64, per-feature log-penalties)", "",
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
    if fixed_cost:
        lines += ["", "### Fixed cost of a call (what does not grow with the problem)", "",
                  "Median over rounds of the mean of many calls in a row. Target (cost issue): "
                  "an estimator call's fixed cost <= 0.5 ms.", "",
                  "| call | ms, tf.function | ms, its concrete function | ms, "
                  "compile_hypergradient |", "|---|---:|---:|---:|"]
    for r in fixed_cost:
        lines.append(f"| {r['call']} | {r['ms_function']:.3f} | {r['ms_concrete']:.3f} | "
                     f"{r['ms_compiled']:.3f} |")
    if memory:
        lines += ["", "### Peak memory against the horizon T (tf.function, float32)", "",
                  "Resident: peak resident memory of the first execution above that before it "
                  "(default allocator). Tensors: peak bytes held in tensors during it (BFC "
                  "allocator, a separate process).", "",
                  "| mode | T | resident (MiB) | vs smallest T | tensors (MiB) | vs smallest T "
                  "| seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in ("reverse", "forward"):
        mode_rows = [r for r in memory if r["mode"] == mode]
        for r in mode_rows:
            base = mode_rows[0]
            tensors, ratio = "n/a", "n/a"
            if r.get("tensor_peak_mib") is not None:
                tensors = f"{r['tensor_peak_mib']:.1f}"
                ratio = f"{r['tensor_peak_mib'] / base['tensor_peak_mib']:.2f}x"
            resident, resident_ratio = "n/a", "n/a"
            if r["peak_mib"] is not None:
                resident = f"{r['peak_mib']:.1f}"
                if base["peak_mib"] is not None:
                    resident_ratio = f"{r['peak_mib'] / base['peak_mib']:.2f}x"
            lines.append(f"| {mode} | {r['T']} | {resident} | "
                         f"{resident_ratio} | {tensors} | {ratio} | "
                         f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(timing, memory, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if memory:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for mode, color in (("reverse", "C0"), ("forward", "C1")):
            rows = [r for r in memory if r["mode"] == mode]
            horizons = [r["T"] for r in rows]
            measured = [r for r in rows if r["peak_mib"] is not None]
            ax1.plot([r["T"] for r in measured], [max(r["peak_mib"], 1e-2) for r in measured],
                     marker="o", color=color, label=f"{mode} mode, resident")
            if all(r.get("tensor_peak_mib") is not None for r in rows):
                ax1.plot(horizons, [max(r["tensor_peak_mib"], 1e-2) for r in rows], marker="s",
                         linestyle="--", color=color, label=f"{mode} mode, tensors")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("horizon T (inner steps)")
        ax1.set_ylabel("peak memory of the first execution (MiB)")
        ax1.set_title("Memory against horizon")
        ax1.legend(fontsize=8)
    else:
        fig, ax2 = plt.subplots(1, 1, figsize=(7, 4.5))
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
        FLAGS.count_tensors = False  # one subprocess less; tests count tensors directly
        # and memory_table runs every (mode, T) in one process: not a measurement either
    if FLAGS.timing_only:
        FLAGS.ridge_dims, FLAGS.horizons = [], []
    start = time.perf_counter()
    print("1/3 ridge accuracy" + ("" if FLAGS.ridge_dims else ": skipped"), flush=True)
    ridge = ridge_table() if FLAGS.ridge_dims else []
    print("2/3 time per hypergradient", flush=True)
    timing = timing_table()
    fixed_cost = fixed_cost_table()
    print("3/3 memory against horizon" + ("" if FLAGS.horizons else ": skipped"), flush=True)
    memory = memory_table() if FLAGS.horizons else []
    report = markdown(ridge, timing, memory, time.perf_counter() - start, fixed_cost)
    print("\n" + report)
    stem = "hypergrad_timing" if FLAGS.timing_only else "hypergrad"
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, f"{stem}.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, f"{stem}.json"), "w") as f:
        json.dump({"ridge": ridge, "timing": timing, "fixed_cost": fixed_cost, "memory": memory,
                   "tensorflow": tf.__version__, "quick": FLAGS.quick,
                   "timing_only": FLAGS.timing_only}, f, indent=2)
    plot(timing, memory, os.path.join(FLAGS.output_dir, f"{stem}.png"))
    print(f"Wrote {FLAGS.output_dir}/{stem}.md, {stem}.json, {stem}.png")


if __name__ == "__main__":
    app.run(main)
