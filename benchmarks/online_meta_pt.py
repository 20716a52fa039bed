r"""MetaPretrainer's PT stage: implicit (Neumann) against HyperDistill's online term, on the
synthetic multitask problem with known helpful tasks.

    python -m benchmarks.online_meta_pt             # 5 seeds, about 3 minutes on 2 cores
    python -m benchmarks.online_meta_pt --seeds=0,1 --epochs=3   # smoke

The problem is tests/meta_pt_toy.py (synthetic data, not a real dataset): 30 PT tasks on 20
Gaussian inputs, of which tasks 0-9 are noisy copies of the FT rule, 10-19 directions the FT
task does not use and 20-29 random labels; an MLP encoder 20-32-4, Adam 1e-2 for PT and the FT
head, TaskWeights (30 logits) under Adam; one warm-up epoch, then a hyperstep after every PT
step. The learned weights are judged by their AUROC at telling the helpful tasks from the
others. Arms differ only in the PT stage of the hyperstep:
- neumann: `linalg.neumann(1)` at the PT learning rate (the default, Raghu et al.);
- one_step: `HyperDistill(sgd(1e-2), gamma=0)`, the one-step term (no second-order history);
- hyperdistill: gamma 0.99, a reference of 10 steps every 50, the anchor moved every 50 steps;
- hyperdistill_from_w0: the same with the line from the weights at compile (the paper's).
Reports the AUROC per arm (mean +- std), paired differences to one_step and to neumann (95% t
intervals), and seconds per epoch of hypersteps (the median over the epochs after the first
two: the warm-up epoch and the one that compiles the hyperstep).
Writes <output_dir>/online_meta_pt.{md,json}.
"""

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402  (sets the Keras backend first)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from apps import runner  # noqa: E402
from tests import meta_pt_toy  # noqa: E402

FLAGS = flags.FLAGS

ARMS = ("neumann", "one_step", "hyperdistill", "hyperdistill_from_w0")
BASELINES = ("one_step", "neumann")


def define_flags():
    """The flags (defined only when run as a program: tests import this module next to other
    benchmarks whose flags share names)."""
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds of the synthetic problem.")
    flags.DEFINE_integer("epochs", 12, "Epochs of 50 steps (the first is warm-up).")
    flags.DEFINE_string("output_dir", os.path.join(ROOT, "benchmarks", "results"),
                        "Where online_meta_pt.md and .json are written.")


def online_stage(arm):
    """The ``online`` argument of MetaPretrainer for ``arm`` (None: the implicit stage)."""
    if arm == "neumann":
        return None
    if arm == "one_step":
        return km.HyperDistill(km.optim.sgd(1e-2), 0.0, distill_every=0)
    return km.HyperDistill(km.optim.sgd(1e-2), 0.99, distill_every=50, reference_steps=10,
                           anchor_every=50 if arm == "hyperdistill" else None)


class EpochTimes(keras.callbacks.Callback):
    """Seconds of every epoch."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def run(arm, seed, epochs):
    x, y, x_ft, y_ft, helpful = meta_pt_toy.synthetic_tasks(seed)
    kwargs = {} if arm == "neumann" else {"online": online_stage(arm)}
    model = meta_pt_toy.build(seed, y.shape[1], **kwargs)
    times = EpochTimes()
    model.fit(meta_pt_toy.stream(seed, x, y, x_ft, y_ft), epochs=epochs, steps_per_epoch=50,
              verbose=0, callbacks=[times])
    out = {"auroc": float(roc_auc_score(helpful, model.meta_layer.task_weights())),
           "seconds_per_epoch": float(np.median(times.seconds[2:] or times.seconds))}
    if model.online is not None:
        out["scale"] = float(model.online.scale)
    return out


def report(results, seeds):
    lines = ["| arm | AUROC of the task weights (mean +- std) | per seed | seconds per epoch "
             "of hypersteps |", "|---|---:|---|---:|"]
    for arm in ARMS:
        values = [results[arm][s]["auroc"] for s in seeds]
        mean, std = runner._mean_std(values)
        seconds = sorted(results[arm][s]["seconds_per_epoch"] for s in seeds)[len(seeds) // 2]
        lines.append(f"| {arm} | {mean:.3f} +- {std:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | {seconds:.2f} |")
    paired = {}
    lines += ["", "Paired by seed (arm - baseline, AUROC; mean [95% t interval]):", "",
              "| arm | baseline | difference |", "|---|---|---:|"]
    for baseline in BASELINES:
        paired[baseline] = {}
        for arm in ARMS:
            if arm == baseline:
                continue
            p = runner.paired_difference([results[arm][s]["auroc"] for s in seeds],
                                         [results[baseline][s]["auroc"] for s in seeds])
            paired[baseline][arm] = p
            ci = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
            lines.append(f"| {arm} | {baseline} | {p['mean_difference']:+.3f}{ci} |")
    return "\n".join(lines) + "\n", paired


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    results = {arm: {} for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            results[arm][seed] = run(arm, seed, FLAGS.epochs)
            print(f"seed {seed} {arm}: {results[arm][seed]}", flush=True)
    text, paired = report(results, seeds)
    header = ("## MetaPretrainer's PT stage: implicit against HyperDistill's online term\n\n"
              f"`python -m benchmarks.online_meta_pt` ({len(seeds)} seeds, {FLAGS.epochs} epochs "
              "of 50 steps; synthetic tasks of tests/meta_pt_toy.py).\n\n")
    runner.write_report(FLAGS.output_dir, "online_meta_pt", header + text, {
        "epochs": FLAGS.epochs, "paired": paired,
        "per_seed": {arm: {str(s): r for s, r in v.items()} for arm, v in results.items()}})
    print(header + text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
