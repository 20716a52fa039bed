r"""Long-horizon schedules at equal wall-clock: hypergradients against gradient-free search.

    python -m benchmarks.long_horizon                       # 3 seeds x 180 s per method
    python -m benchmarks.long_horizon --budget_seconds=60 --bench_seeds=0

The problem of apps/lr_schedules.py (every flag of the app applies: --inner_steps, --blocks,
--hidden, --float64, ...): Fashion-MNIST, an MLP trained for T inner steps of SGD with averaged
momentum under learning-rate, momentum and weight-decay schedules of B blocks each (3B
hyperparameters). Per seed every search method gets the same wall-clock budget
(--budget_seconds) and every training run it asks for starts from its own fresh
initialisation and batch order (the k-th run of a method in a seed: the same for every method):
- hypergradient: the app's reversible arm (full runs, exact hypergradient, clipped outer SGD);
  each outer step's run is one evaluation of the schedule it used;
- random: schedules drawn uniformly (learning rates log-uniform in [1e-3, 2], momenta in
  [0.01, 0.99], weight decays in [0, 5e-3]), one full run each;
- dehb: DEHB (the `dehb` package) over the same space, fidelity = inner steps from T / 9 to T
  (a shorter run compresses the schedules onto its length). One worker by default, in this
  process; --dehb_workers=K > 1 runs K trials at a time on a local Dask cluster of K worker
  processes (each with cores / K TensorFlow threads), --dask_scheduler=ADDRESS on an existing
  Dask cluster (more machines). Workers build the problem and compile every fidelity before
  the clock starts; runs take their fresh start from a cluster-wide counter, in the order they
  start (the same starts as in-process);
- hyperband: KerasTuner's Hyperband over the same space, max_epochs 9 units of T / 9 steps,
  factor 3 (each trial trains from scratch for its budget).
Also, once each: the hand-tuned constant schedule and the greedy online one-step arm of the app.
A method's pick is the schedule of its best validation accuracy among its full-horizon runs; it is
then trained once more from the seed's evaluation start (as the app judges arms) for the test
accuracy. Reported: best validation accuracy against wall-clock (plot; median over seeds),
test accuracy per method, and the paired (same seed) difference of each method to random search
with a 95% t interval.

Writes benchmarks/results/long_horizon.{md,json,png} (or --results_dir).
"""

import json
import os
import sys
import tempfile
import time
import warnings

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import lr_schedules as app_module  # noqa: E402  (defines the app's flags)
from apps import runner  # noqa: E402
from benchmarks.dehb_parallel import WaitingDEHB, lowest_fidelity  # noqa: E402
from benchmarks.long_horizon_trials import (SEARCH_STREAM, DaskObjective, from_flat,  # noqa: E402
                                           training_run, warm_up, warm_worker)

FLAGS = flags.FLAGS
METHODS = ("hypergradient", "random", "dehb", "hyperband")
flags.DEFINE_list("methods", list(METHODS), "Search methods, out of " + ", ".join(METHODS) + ".")
flags.DEFINE_float("budget_seconds", 180.0, "Wall-clock budget of every search method per seed.")
flags.DEFINE_list("bench_seeds", ["0", "1", "2"], "Seeds (each: every method once).")
flags.DEFINE_integer("fidelity_units", 9, "dehb / hyperband: the shortest run is T / this.")
flags.DEFINE_integer("dehb_workers", 1, "dehb: trials run at a time. 1: in this process; K > 1: "
                     "on a local Dask cluster of K worker processes (cores / K threads each).")
flags.DEFINE_string("dask_scheduler", None, "dehb: address of a running Dask scheduler (e.g. "
                    "tcp://10.0.0.5:8786) whose workers run the trials instead of a local "
                    "cluster; they must be able to import this repository and read --images_dir.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where long_horizon.md, .json and .png are written.")

LR_RANGE, WD_RANGE = (1e-3, 2.0), (0.0, 5e-3)


class Budget(Exception):
    """Raised inside a method once its wall-clock budget is spent."""


class Search:
    """Evaluations of one method in one seed: each a training run of ``steps`` from the next
    fresh start; keeps the trace (seconds since the method began, steps, validation accuracy,
    schedule)."""

    def __init__(self, exp, seed, budget):
        self.exp, self.seed, self.budget = exp, seed, budget
        self.start = time.perf_counter()
        self.trace = []

    def elapsed(self):
        return time.perf_counter() - self.start

    def check(self):
        if self.elapsed() > self.budget:
            raise Budget()

    def record(self, schedule, steps, val_accuracy):
        self.trace.append({"seconds": self.elapsed(), "steps": int(steps),
                           "val_accuracy": float(val_accuracy), "schedule": schedule})

    def evaluate(self, schedule, steps=None):
        """Validation accuracy of a run of ``steps`` (default T) with ``schedule`` (lists)."""
        self.check()
        steps = self.exp.config.inner_steps if steps is None else int(steps)
        accuracy = training_run(self.exp, self.seed, len(self.trace), schedule, steps)
        self.record(schedule, steps, accuracy)
        return accuracy


def random_schedule(rng, blocks):
    return {"lr": list(np.exp(rng.uniform(np.log(LR_RANGE[0]), np.log(LR_RANGE[1]), blocks))),
            "momentum": list(rng.uniform(0.01, 0.99, blocks)),
            "wd": list(rng.uniform(WD_RANGE[0], WD_RANGE[1], blocks))}


def run_random(search):
    rng = np.random.default_rng([search.seed, 7])
    while True:
        search.evaluate(random_schedule(rng, search.exp.config.blocks))


def run_hypergradient(search):
    """The app's reversible outer loop, one evaluation per outer step."""
    exp, config = search.exp, search.exp.config
    schedule = app_module.constant_schedule(config, config.init_lr, config.init_momentum,
                                            config.init_wd)
    velocity = {k: tf.zeros([config.blocks], config.dtype) for k in app_module.SCHEDULES}
    while True:
        search.check()
        result, new, velocity = exp.outer_step("reversible", schedule, velocity, search.seed,
                                               SEARCH_STREAM, len(search.trace))
        search.record(app_module.listed(schedule), config.inner_steps,
                      exp.accuracy(result.params, exp.data.x_val, exp.data.y_val))
        schedule = new


def config_space(blocks, seed):
    import ConfigSpace as CS
    cs = CS.ConfigurationSpace(seed=seed)
    for b in range(blocks):
        cs.add([CS.UniformFloatHyperparameter(f"lr_{b}", *LR_RANGE, log=True),
                CS.UniformFloatHyperparameter(f"momentum_{b}", 0.01, 0.99),
                CS.UniformFloatHyperparameter(f"wd_{b}", *WD_RANGE)])
    return cs


def dehb_optimizer(search, objective, output_path, **workers):
    """DEHB over the schedule space, fidelities T / --fidelity_units ... T; ``workers``:
    n_workers=1 (in this process) or client=<Dask client>. `WaitingDEHB` behaves as
    `dehb.DEHB` without a client."""
    config = search.exp.config
    return WaitingDEHB(f=objective, cs=config_space(config.blocks, search.seed),
                       min_fidelity=lowest_fidelity(config.inner_steps, FLAGS.fidelity_units),
                       max_fidelity=config.inner_steps, eta=3, output_path=output_path,
                       seed=search.seed, **workers)


def run_dehb(search):
    config = search.exp.config

    def objective(cfg, fidelity, **kwargs):
        start = time.perf_counter()
        try:
            accuracy = search.evaluate(from_flat(dict(cfg), config.blocks), round(fidelity))
        except Budget:  # DEHB stops once the reported costs reach total_cost
            return {"fitness": 1.0, "cost": search.budget}
        return {"fitness": 1.0 - accuracy, "cost": time.perf_counter() - start}

    with tempfile.TemporaryDirectory() as tmp:
        if DASK["client"] is None:
            dehb_optimizer(search, objective, tmp, n_workers=1).run(total_cost=search.budget)
        else:
            run_dehb_on_dask(search, DASK["client"], tmp)


# ----------------------------------------------------------------------------- DEHB on Dask

DASK = {"client": None}   # set by main when --dehb_workers > 1 or --dask_scheduler


def run_dehb_on_dask(search, client, output_path):
    """DEHB with the client's workers running the trials in parallel; the trace is rebuilt
    from DEHB's history (each run at its end time on the method's clock)."""
    from distributed import Variable
    counter = f"long_horizon_runs_{search.seed}_{time.time_ns()}"
    Variable(counter, client=client).set(0)
    wall_start = time.time() - search.elapsed()   # the method's clock, in time.time()
    objective = DaskObjective(search.exp.config, search.seed, wall_start + search.budget,
                              counter)
    optimizer = dehb_optimizer(search, objective, output_path, client=client)
    optimizer.run(total_cost=search.budget - search.elapsed())
    runs = [entry[-1] for entry in optimizer.history if not entry[-1].get("skipped")]
    for info in sorted(runs, key=lambda r: r["finished"]):
        search.trace.append({"seconds": info["finished"] - wall_start, "steps": info["steps"],
                             "val_accuracy": info["val_accuracy"], "schedule": info["schedule"],
                             "index": info["index"], "worker": info["worker"],
                             "run_seconds": info["finished"] - info["started"]})


def start_dask(config):
    """The client of --dask_scheduler, or a local cluster of --dehb_workers processes (each
    with cores / workers TensorFlow threads); every worker warmed up. None for in-process."""
    if FLAGS.dask_scheduler is None and FLAGS.dehb_workers <= 1:
        return None
    import logging as std_logging
    from distributed import Client, LocalCluster
    std_logging.getLogger("distributed").setLevel(std_logging.WARNING)
    if FLAGS.dask_scheduler:
        client = Client(FLAGS.dask_scheduler)
    else:
        import dask.config
        # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc
        # hand freed memory back to the system at once: TensorFlow's per-step tensors then
        # cost page faults on every allocation (a 2,000-step run took 12 s in a worker against
        # 3.8 s in a plain one-thread process). The workers keep glibc's default.
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
        threads = str(max(1, (os.cpu_count() or 1) // FLAGS.dehb_workers))
        saved = {k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS", "PYTHONPATH")}
        os.environ["TF_NUM_INTRAOP_THREADS"] = threads   # read by the workers' TensorFlow
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, saved["PYTHONPATH"]]))
        try:
            cluster = LocalCluster(n_workers=FLAGS.dehb_workers, threads_per_worker=1,
                                   processes=True, dashboard_address=None)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        client = Client(cluster)
    workers = client.run(warm_worker, config, FLAGS.fidelity_units)
    print(f"DEHB on Dask: {len(workers)} workers (pids {sorted(workers.values())}), warmed up",
          flush=True)
    return client


def run_hyperband(search):
    import keras_tuner
    config = search.exp.config
    T, units = config.inner_steps, FLAGS.fidelity_units

    space = keras_tuner.HyperParameters()  # declared up front: the oracle samples from it
    for b in range(config.blocks):
        space.Float(f"lr_{b}", *LR_RANGE, sampling="log")
        space.Float(f"momentum_{b}", 0.01, 0.99)
        space.Float(f"wd_{b}", *WD_RANGE)

    class ScheduleHyperband(keras_tuner.Hyperband):
        def run_trial(self, trial, *args, **kwargs):
            hp = trial.hyperparameters
            steps = T * hp.get("tuner/epochs") // units
            try:
                accuracy = search.evaluate(from_flat(hp.values, config.blocks), steps)
            except Budget:
                raise keras_tuner.errors.FatalError("budget spent") from None
            return {"val_accuracy": accuracy}

    with tempfile.TemporaryDirectory() as tmp:
        tuner = ScheduleHyperband(
            objective=keras_tuner.Objective("val_accuracy", "max"), max_epochs=units,
            factor=3, hyperband_iterations=1000, seed=search.seed, hyperparameters=space,
            tune_new_entries=False, directory=tmp,
            project_name="schedules", overwrite=True)
        try:
            tuner.search(verbose=0)
        except keras_tuner.errors.FatalError:
            pass


RUNNERS = {"hypergradient": run_hypergradient, "random": run_random, "dehb": run_dehb,
           "hyperband": run_hyperband}


def best_full_run(trace, horizon):
    full = [t for t in trace if t["steps"] == horizon] or trace
    return max(full, key=lambda t: t["val_accuracy"]) if full else None


def run_seed(exp, seed):
    rows = {}
    for method in FLAGS.methods:
        runner.seed_everything(seed)
        search = Search(exp, seed, FLAGS.budget_seconds)
        try:
            RUNNERS[method](search)
        except Budget:
            pass
        trace = [t for t in search.trace if t["seconds"] <= FLAGS.budget_seconds]
        best = best_full_run(trace, exp.config.inner_steps)
        if best is None:
            raise RuntimeError(f"{method}: no training run finished within --budget_seconds="
                               f"{FLAGS.budget_seconds:g} in seed {seed}; give it more time")
        final = exp.evaluate(app_module.as_tensors(exp.config, best["schedule"]), seed)
        rows[method] = {"trace": trace, "evaluations": len(trace), "best": best, **final}
        print(f"  seed {seed} {method}: {len(trace)} runs, best validation accuracy "
              f"{best['val_accuracy']:.4f}, test accuracy {final['test_accuracy_final']:.4f}",
              flush=True)
    for arm in ("hand_tuned", "greedy"):
        runner.seed_everything(seed)
        record = app_module.run_arm(exp, arm, seed)
        rows[arm] = {"seconds": record["seconds"], "schedule": record["schedule"],
                     **{k: record[k] for k in ("test_accuracy_final", "val_accuracy_final",
                                               "test_loss")}}
        print(f"  seed {seed} {arm}: test accuracy {record['test_accuracy_final']:.4f} "
              f"({record['seconds']:.1f} s)", flush=True)
    return rows


def best_so_far(trace, grid, horizon):
    """Best full-horizon validation accuracy reached by each time of ``grid`` (NaN before)."""
    out = np.full(len(grid), np.nan)
    best = -np.inf
    points = sorted((t["seconds"], t["val_accuracy"]) for t in trace if t["steps"] == horizon)
    j = 0
    for i, g in enumerate(grid):
        while j < len(points) and points[j][0] <= g:
            best = max(best, points[j][1])
            j += 1
        if best > -np.inf:
            out[i] = best
    return out


def report(results, config, elapsed):
    seeds = sorted(results)
    methods = list(FLAGS.methods) + ["hand_tuned", "greedy"]
    lines = ["## Long-horizon schedules: hypergradients against gradient-free search", "",
             f"`python -m benchmarks.long_horizon --budget_seconds={FLAGS.budget_seconds:g} "
             f"--bench_seeds={','.join(map(str, seeds))}`; TensorFlow {tf.__version__}, "
             f"{os.cpu_count()} CPU cores, {elapsed / 60:.0f} min in all. Fashion-MNIST MLP "
             f"784-{config.hidden}-10, T = {config.inner_steps} steps, {config.blocks} blocks x 3 "
             f"schedules, {'float64' if config.float64 else 'float32'}.", "",
             "| method | runs in budget (mean) | best validation accuracy (median over seeds) "
             "| test accuracy (mean +- std) | paired vs random: test accuracy [95% t] |",
             "|---|---:|---:|---:|---|"]
    for method in methods:
        rows = [results[s][method] for s in seeds if method in results[s]]
        if not rows:
            continue
        test = [r["test_accuracy_final"] for r in rows]
        runs = (f"{np.mean([r['evaluations'] for r in rows]):.1f}" if "evaluations" in rows[0]
                else f"1 ({np.mean([r['seconds'] for r in rows]):.0f} s)")
        best = (f"{np.median([r['best']['val_accuracy'] for r in rows]):.4f}" if "best" in rows[0]
                else f"{np.median([r['val_accuracy_final'] for r in rows]):.4f} (its run)")
        paired = "-"
        if method != "random" and all("random" in results[s] for s in seeds):
            d = runner.paired_difference(test, [results[s]["random"]["test_accuracy_final"]
                                                for s in seeds])
            paired = (f"{d['mean_difference']:+.4f}" + (
                f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else " (1 seed)"))
        lines.append(f"| {method} | {runs} | {best} | {np.mean(test):.4f} +- {np.std(test):.4f} "
                     f"| {paired} |")
    lines += ["", "Best validation accuracy: of the method's full-horizon runs within the "
              "budget, each from its own fresh start (hand_tuned and greedy: their one run, "
              "from the evaluation start). Test accuracy: the picked schedule trained again "
              "from the seed's evaluation start."]
    return "\n".join(lines) + "\n"


def plot(results, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.linspace(0, FLAGS.budget_seconds, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    medians = []
    for i, method in enumerate(FLAGS.methods):
        curves = np.array([best_so_far(results[s][method]["trace"], grid, config.inner_steps)
                           for s in sorted(results)])
        for c in curves:
            ax.plot(grid, c, color=f"C{i}", alpha=0.25, lw=0.8)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN before a first run
            median = np.nanmedian(curves, 0)
        ax.plot(grid, median, color=f"C{i}", lw=2, label=method)
        medians.extend(median[grid >= 0.1 * FLAGS.budget_seconds])
    for j, arm in enumerate(("hand_tuned", "greedy")):
        values = [results[s][arm]["val_accuracy_final"] for s in sorted(results)]
        ax.axhline(np.median(values), color=f"C{len(FLAGS.methods) + j}", ls="--", label=arm)
        medians.append(np.median(values))
    tail = [v for v in medians if np.isfinite(v)]  # the medians from 10% of the budget on
    if tail:
        ax.set_ylim(min(tail) - 0.01, max(tail) + 0.01)
    ax.set(xlabel="wall-clock seconds", ylabel="best validation accuracy so far",
           title="Long-horizon schedules at equal budget (median over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    config = app_module.Config.from_flags()
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; out of {', '.join(METHODS)}")
    tf.config.threading.set_inter_op_parallelism_threads(1)
    runner.seed_everything(0)
    experiment = app_module.Experiment(config, app_module.load_data(config))
    start, results = time.perf_counter(), {}
    warm_up(experiment, FLAGS.fidelity_units, "hypergradient" in FLAGS.methods)
    if "dehb" in FLAGS.methods:
        DASK["client"] = start_dask(config)
    try:
        for seed in [int(s) for s in FLAGS.bench_seeds]:
            results[seed] = run_seed(experiment, seed)
    finally:
        if DASK["client"] is not None:
            DASK["client"].close()
    text = report(results, config, time.perf_counter() - start)
    print("\n" + text)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with open(os.path.join(FLAGS.results_dir, "long_horizon.md"), "w") as f:
        f.write(text)
    with open(os.path.join(FLAGS.results_dir, "long_horizon.json"), "w") as f:
        json.dump({"results": {str(s): r for s, r in results.items()},
                   "config": config.results_config(), "budget_seconds": FLAGS.budget_seconds},
                  f, indent=1)
    plot(results, config, os.path.join(FLAGS.results_dir, "long_horizon.png"))
    print(f"Wrote {FLAGS.results_dir}/long_horizon.md, .json, .png")


if __name__ == "__main__":
    app.run(main)
