r"""Online schedules: HyperDistill against the one-step (greedy) hypergradient, at equal
hyper-update cadence and at equal wall-clock, on apps/lr_schedules.py.

    python -m benchmarks.online_schedules            # 5 seeds, about 5 minutes on 2 cores
    python -m benchmarks.online_schedules --seeds=0,1 --app_flags=--inner_steps=200  # smoke

The problem is the app's: an MLP 784-64-10 on Fashion-MNIST, one online training run of 2,000
SGD steps with averaged momentum, in which a single learning rate, momentum and weight decay
are moved every --greedy_every steps by a hypergradient on 500 validation examples (the
clipped outer step of the FDS code). Arms (each an app run over every seed; the app reuses
finished runs):
- greedy: the one-step look-ahead every 20 steps (the app's default);
- greedy_every5: the same every 5 steps, about as many seconds per run as HyperDistill's runs
  (the equal-wall-clock arm: the one-step estimator spending the time on more updates);
- hyperdistill_gamma0.9 / hyperdistill_gamma0.99: `km.HyperDistill` every 20 steps (the app's
  hyperdistill arm), a reference of up to 100 step VJPs every 100 steps;
- hyperdistill_gamma0.99_median: the same with the scale fitted as the median of the last 64
  per-reference fits (``scale_fit="median"``) in place of least squares.
Every arm of a seed starts from the same weights and batch order and draws its validation
minibatches from the same stream (the arms every 20 steps draw the same ones); it is judged on
the Fashion-MNIST test set by the weights its online run ends with. Reports test and
validation accuracy, seconds per run (the median over the seeds after the first, whose run
also traces the compiled functions), the paired difference of
each HyperDistill arm to each greedy arm (95% t intervals over seeds), and a plot of the
learning rate along every run. Writes <output_dir>/online_schedules.{md,json,png}.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from apps import runner  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """The flags (defined only when run as a program: tests import this module next to other
    benchmarks whose flags share names)."""
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds; every arm runs each.")
    flags.DEFINE_string("output_dir",
                        os.path.join(ROOT, "benchmarks", "results", "online_schedules"),
                        "Where online_schedules.md, .json and .png are written.")
    flags.DEFINE_string("runs_dir", os.path.join(ROOT, "runs", "online_schedules"),
                        "The app's output folder of each arm (resumable; finished runs reused).")
    flags.DEFINE_list("app_flags", [], "Extra flags passed to every app run (e.g. "
                      "--images_dir=...).")

# arm: (the app's arm, its flags)
ARMS = {"greedy": ("greedy", ["--greedy_every=20"]),
        "greedy_every5": ("greedy", ["--greedy_every=5"]),
        "hyperdistill_gamma0.9": ("hyperdistill", ["--greedy_every=20",
                                                   "--hyperdistill_gamma=0.9"]),
        "hyperdistill_gamma0.99": ("hyperdistill", ["--greedy_every=20",
                                                    "--hyperdistill_gamma=0.99"]),
        "hyperdistill_gamma0.99_median": ("hyperdistill", [
            "--greedy_every=20", "--hyperdistill_gamma=0.99", "--hyperdistill_scale_fit=median"])}
BASELINES = ("greedy", "greedy_every5")
METRICS = (("test_accuracy_final", "test accuracy"),
           ("val_accuracy_final", "validation accuracy"))


def run_flags(arm, seeds, runs_dir, extra=()):
    """The app's command-line flags for ``arm`` over ``seeds``."""
    app_arm, arm_flags = ARMS[arm]
    return [f"--arms={app_arm}", f"--baseline={app_arm}", f"--seeds={','.join(map(str, seeds))}",
            f"--output_dir={os.path.join(runs_dir, arm)}", "--verbose=0", "--plot=false",
            *arm_flags, *extra]


def run_arm(arm, seeds, runs_dir, extra=()):
    """Runs the app for ``arm``; returns {seed: its record}."""
    cmd = [sys.executable, os.path.join(ROOT, "apps", "lr_schedules.py"),
           *run_flags(arm, seeds, runs_dir, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{proc.stderr[-3000:]}")
    app_arm = ARMS[arm][0]
    records = {}
    for seed in seeds:
        with open(runner.result_path(os.path.join(runs_dir, arm, "results"), app_arm, seed)) as f:
            records[seed] = json.load(f)
    return records


def tables(records, arms, seeds):
    """The report's markdown and the paired differences {baseline: {arm: {metric: ...}}}."""
    lines = ["| arm | test accuracy (mean +- std) | validation accuracy | seconds per run "
             "(median, seeds after the first) | final learning rate (per seed) |",
             "|---|---:|---:|---:|---|"]
    for arm in arms:
        rows = [records[arm][s] for s in seeds]
        test = runner._mean_std([r["test_accuracy_final"] for r in rows])
        val = runner._mean_std([r["val_accuracy_final"] for r in rows])
        seconds = float(np.median([r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]))
        lrs = ", ".join(f"{r['schedule']['lr'][0]:.3g}" for r in rows)
        lines.append(f"| {arm} | {test[0]:.4f} +- {test[1]:.4f} | {val[0]:.4f} | "
                     f"{seconds:.1f} | {lrs} |")
    paired = {}
    lines += ["", "Paired by seed (arm - baseline; mean [95% t interval], per seed):", "",
              "| arm | baseline | test accuracy | validation accuracy | test accuracy per seed |",
              "|---|---|---:|---:|---|"]
    for baseline in BASELINES:
        if baseline not in arms:
            continue
        paired[baseline] = {}
        for arm in arms:
            if not arm.startswith("hyperdistill"):
                continue
            paired[baseline][arm] = {
                key: runner.paired_difference([records[arm][s][key] for s in seeds],
                                              [records[baseline][s][key] for s in seeds])
                for key, _ in METRICS}
            cells = []
            for key, _ in METRICS:
                p = paired[baseline][arm][key]
                ci = ("" if p["ci95"] is None
                      else f" [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
                cells.append(f"{p['mean_difference']:+.4f}{ci}")
            per_seed = ", ".join(
                f"{records[arm][s]['test_accuracy_final'] - records[baseline][s]['test_accuracy_final']:+.4f}"  # noqa: E501
                for s in seeds)
            lines.append(f"| {arm} | {baseline} | {cells[0]} | {cells[1]} | {per_seed} |")
    return "\n".join(lines) + "\n", paired


def plot(records, arms, seeds, inner_steps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.4), sharey=True)
    for ax, arm in zip(axes, arms):
        for seed in seeds:
            history = records[arm][seed]["history"]
            steps = [h["step"] for h in history] + [inner_steps]
            values = [h["schedule"]["lr"][0] for h in history]
            ax.step(steps, values + values[-1:], where="post", lw=1,
                    label=f"seed {seed}: {records[arm][seed]['test_accuracy_final']:.3f}")
        ax.set(title=arm, xlabel="inner step")
        ax.legend(fontsize=7, title="test accuracy", title_fontsize=7)
    axes[0].set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    records = {}
    for arm in ARMS:
        runner.log(f"{arm}: running seeds {seeds}")
        records[arm] = run_arm(arm, seeds, FLAGS.runs_dir, FLAGS.app_flags)
    inner_steps = records["greedy"][seeds[0]]["config"]["inner_steps"]
    text, paired = tables(records, list(ARMS), seeds)
    config = {arm: run_flags(arm, seeds, FLAGS.runs_dir, FLAGS.app_flags) for arm in ARMS}
    header = ("## Online schedules: HyperDistill against the one-step hypergradient\n\n"
              f"`python -m benchmarks.online_schedules` ({len(seeds)} seeds; app flags per arm "
              "in online_schedules.json).\n\n")
    runner.write_report(FLAGS.output_dir, "online_schedules", header + text, {
        "app_flags": config, "paired": paired,
        "per_seed": {arm: {str(s): {k: records[arm][s][k] for k, _ in METRICS}
                           | {"seconds": records[arm][s]["seconds"],
                              "hyperdistill_scale": records[arm][s].get("hyperdistill_scale")}
                           for s in seeds} for arm in ARMS}})
    plot(records, list(ARMS), seeds, inner_steps,
         os.path.join(FLAGS.output_dir, "online_schedules.png"))
    print(header + text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
