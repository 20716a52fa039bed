"""One training run of a schedule, for benchmarks.long_horizon: in its process and on Dask
workers (this module defines no flags, so workers import it without the benchmark's).

Each run of a (seed, method) starts from its own fresh initialisation and batch order: the
k-th run uses index k of stream SEARCH_STREAM (`lr_schedules.Experiment.init`, `batch_order`).
"""

import os
import time

import tensorflow as tf
from apps import lr_schedules as app_module

__all__ = ["SEARCH_STREAM", "from_flat", "training_run", "warm_up", "worker_experiment",
           "warm_worker", "DaskObjective"]

SEARCH_STREAM = 3
_WORKER_STATE = {}        # per worker process: the experiment, built once


def from_flat(values, blocks):
    """{"lr": [...], ...} from a mapping name_b -> value (ConfigSpace / KerasTuner)."""
    return {name: [float(values[f"{name}_{b}"]) for b in range(blocks)]
            for name in app_module.SCHEDULES}


def training_run(exp, seed, index, schedule, steps):
    """Validation accuracy of the run of ``steps`` inner steps with ``schedule`` (lists) from
    fresh start ``index`` of ``seed``."""
    config = exp.config
    params, _ = exp.train(exp.init(seed, SEARCH_STREAM, index),
                          app_module.as_tensors(config, schedule),
                          app_module.batch_order(config, seed, SEARCH_STREAM, index, steps))
    return exp.accuracy(params, exp.data.x_val, exp.data.y_val)


def warm_up(exp, fidelity_units, hypergradient):
    """Traces what the methods run (the hypergradient, training runs of every fidelity) before
    any clock starts, so that no method's budget pays for compilation."""
    config = exp.config
    schedule = app_module.constant_schedule(config, config.init_lr, config.init_momentum,
                                            config.init_wd)
    params = exp.init(0, SEARCH_STREAM, 0)
    if hypergradient:
        exp._hypergradient["reversible"](
            params, schedule, app_module.batch_order(config, 0, SEARCH_STREAM, 0).batches)
    lengths = {config.inner_steps} | {config.inner_steps * u // fidelity_units
                                      for u in range(1, fidelity_units + 1)}
    for steps in sorted(lengths):
        exp.train(params, schedule, app_module.batch_order(config, 0, SEARCH_STREAM, 0, steps))


def worker_experiment(config):
    """The experiment in a Dask worker (built and cached on the first call)."""
    if _WORKER_STATE.get("config") != config:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        _WORKER_STATE.update(config=config, experiment=app_module.Experiment(
            config, app_module.load_data(config)))
    return _WORKER_STATE["experiment"]


def warm_worker(config, fidelity_units):
    """Run on every worker before the clocks: builds the experiment, compiles every length."""
    exp = worker_experiment(config)
    warm_up(exp, fidelity_units, hypergradient=False)
    return os.getpid()


class DaskObjective:
    """DEHB's objective on a Dask worker: one training run of the configuration, from the
    next fresh start of the (seed, method) (a counter on the scheduler, in start order). Runs
    that would start after the wall-clock ``deadline`` (time.time()) are not run. The result's
    ``info`` carries what the trace needs (start and end times, steps, accuracy, schedule)."""

    def __init__(self, config, seed, deadline, counter):
        self.config, self.seed, self.deadline, self.counter = config, seed, deadline, counter

    def next_index(self):
        from distributed import Lock, Variable
        with Lock(self.counter):
            variable = Variable(self.counter)
            index = int(variable.get())
            variable.set(index + 1)
        return index

    def __call__(self, cfg, fidelity, **kwargs):
        started = time.time()
        if started > self.deadline:
            return {"fitness": 1.0, "cost": 0.0, "info": {"skipped": True}}
        schedule, steps = from_flat(dict(cfg), self.config.blocks), round(fidelity)
        index = self.next_index()
        accuracy = training_run(worker_experiment(self.config), self.seed, index, schedule,
                                steps)
        finished = time.time()
        return {"fitness": 1.0 - accuracy, "cost": finished - started,
                "info": {"started": started, "finished": finished, "steps": int(steps),
                         "val_accuracy": float(accuracy), "schedule": schedule,
                         "index": index, "worker": os.getpid()}}

