r"""Online hypergradients on one training run: HyperDistill against the one-step and the
truncated (K = 5) hypergradients, at equal inner steps, with their wall-clock.

    python -m benchmarks.online_hypergradients              # 5 seeds, ~15 min on 2 cores
    python -m benchmarks.online_hypergradients --quick      # 2 seeds, 20 inner steps (smoke)
    python -m benchmarks.online_hypergradients --weighting=mwn --hyper_lr=0.001 \
        --seeds=5,6,7,8,9,10,11,12,13,14

The problem is apps/digits_reweighting.py: per-example loss weights sigmoid(logit) for the
1,000 training examples of scikit-learn's digits with 40% of the labels replaced, an MLP
64-64-10 trained by full-batch SGD (0.5), the clean validation loss (300 examples) as the
outer objective, Adam (0.1) on the logits. ``--weighting=mwn`` meta-learns a Meta-Weight-Net
(loss -> weight, shared by every example; the app's --mwn_input=current) in place of the
logits, with Adam at --hyper_lr. Every arm trains --inner_steps_total SGD steps (the longer
arm 1.2x as many) from the seed's initialisation and updates the logits online:
- one_step: after every step, the one-step look-ahead hypergradient (``Unrolled(sgd, 1)``);
- hyperdistill: after every step, ``HyperDistill`` (gamma --hyperdistill_gamma, a reference
  every --hyperdistill_every steps);
- truncated5: every 5 steps, the hypergradient through those 5 steps (``Unrolled(sgd, 5)``),
  so one logit update per 5 steps;
- one_step_1.2x_steps (not run by default): one_step for 1.2x the steps, so at least
  HyperDistill's wall-clock (the s / inner step column shows the ratio).
Each (arm, seed) runs the app in its own process (reused when its summary exists for the same
flags). The seed fixes the split, the noise and the initialisation, so arms are paired by seed;
the app's uniform-weights run of the same steps is the same for every arm of a seed (the
longer arm's runs longer; the table's uniform figure comes from an arm of --inner_steps_total).

Reports, per arm: test accuracy and test loss of the trained MLP, the validation loss and
accuracy, the AUROC
of the learned weights for telling clean from corrupted examples, seconds per inner step (the
mean hypergradient-and-step of the run after its first, which compiles; HyperDistill's
references included); the paired difference of hyperdistill to each other arm with a 95% t
interval over seeds; the validation loss against the inner step (plot).
Writes benchmarks/results/online_hypergradients.{md,json,png} (online_hypergradients_mwn.* with
--weighting=mwn, --results_name.* when given, with _quick after --quick; or --output_dir).
"""

import csv
import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from apps import runner  # noqa: E402

ARMS = {  # flags of apps/digits_reweighting.py; the inner steps of one outer step
    "one_step": (["--estimator=unrolled"], 1),
    "hyperdistill": (["--estimator=hyperdistill"], 1),
    "truncated5": (["--estimator=unrolled"], 5),
    "one_step_1.2x_steps": (["--estimator=unrolled"], 1),
}
# arms that train longer than --inner_steps_total, by this factor: one-step given at least
# HyperDistill's wall-clock (its per-step cost is below 1.2x one-step's on this problem)
LONGER = {"one_step_1.2x_steps": 1.2}
DEFAULT_ARMS = ["one_step", "hyperdistill", "truncated5"]
METRICS = (("test_accuracy_meta", "test accuracy", "+.4f"), ("test_loss_meta", "test loss", "+.4f"),
           ("val_loss_meta", "validation loss", "+.4f"),
           ("val_accuracy_meta", "validation accuracy", "+.4f"),
           ("auroc_weights_vs_clean", "AUROC clean vs corrupted", "+.4f"))

FLAGS = flags.FLAGS
# this benchmark's flags (output_dir aside), shown in its report when set away from default
FLAG_NAMES = ("arms", "seeds", "inner_steps_total", "hyperdistill_gamma", "hyperdistill_every",
              "hyperdistill_reference_steps", "hyperdistill_anchor_every", "weighting",
              "hyper_lr", "results_name", "quick")


def define_flags():
    """The flags (defined only when run as a program: tests import this module next to other
    benchmarks whose flags share names)."""
    flags.DEFINE_list("arms", DEFAULT_ARMS, "Arms, out of " + ", ".join(ARMS) + ".")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (split, noise, initialisation).")
    flags.DEFINE_integer("inner_steps_total", 750, "SGD steps of every run (a multiple of 5).")
    # gamma 0.99, a reference of 100 steps every 100, no anchor moves: the app's defaults
    runner.define_hyperdistill_flags("HyperDistill", every_default=100)
    flags.DEFINE_enum("weighting", "logits", ["logits", "mwn"], "What is meta-learned: one "
                      "weight logit per example, or a Meta-Weight-Net (the app's --weighting).")
    flags.DEFINE_float("hyper_lr", None, "Adam's rate on the hyperparameters (default: the "
                       "app's, 0.1, set for the logits).")
    flags.DEFINE_string("results_name", None, "Name of the report files and runs folder "
                        "(default: online_hypergradients, + _mwn with --weighting=mwn, + _quick).")
    flags.DEFINE_bool("quick", False, "2 seeds, 20 inner steps, a reference every 5: a smoke run.")
    flags.DEFINE_string("output_dir", os.path.join(ROOT, "benchmarks", "results"),
                        "Where online_hypergradients.{md,json,png} and the runs go.")


def run_flags(arm, seed, total, gamma, every, extra=()):
    """The app's flags for ``arm`` and ``seed``; ``extra`` (e.g. --weighting) go last."""
    estimator_flags, inner = ARMS[arm]
    outer = int(round(total * LONGER[arm])) if arm in LONGER else total // inner
    return estimator_flags + [f"--inner_steps={inner}", f"--outer_steps={outer}",
                              f"--seed={seed}", f"--hyperdistill_gamma={gamma}",
                              f"--hyperdistill_every={every}", "--checkpoint_every=0",
                              f"--log_every={max(outer, 1)}", "--noplot", *extra]


def non_default_flags():
    """``--name=value`` for each of FLAG_NAMES set away from its default (lists joined by
    commas, a true bool as ``--name``)."""
    shown = []
    for name in FLAG_NAMES:
        value, default = FLAGS[name].value, FLAGS[name].default
        if value != default:
            value = ",".join(map(str, value)) if isinstance(value, list) else value
            shown.append(f"--{name}" if value is True else f"--{name}={value}")
    return shown


def run_one(run_dir, arguments):
    """The app's summary for ``arguments`` in ``run_dir`` (run now unless stored for them,
    with every metric of METRICS)."""
    summary_path = os.path.join(run_dir, "summary.json")
    flags_path = os.path.join(run_dir, "benchmark_flags.json")
    if os.path.exists(summary_path) and os.path.exists(flags_path):
        with open(flags_path) as f:
            if json.load(f) == arguments:
                with open(summary_path) as f:
                    summary = json.load(f)
                if all(key in summary for key, _, _ in METRICS):  # else made before a metric
                    return summary
    os.makedirs(run_dir, exist_ok=True)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "digits_reweighting.py"),
                           f"--output_dir={run_dir}", "--noresume", *arguments],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"digits_reweighting {' '.join(arguments)} failed:\n"
                           f"{proc.stderr[-3000:]}")
    runner.write_json(flags_path, arguments)
    with open(summary_path) as f:
        return json.load(f)


def validation_curve(run_dir, inner):
    """(inner step, validation loss of the meta-learned run) from the app's history."""
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["outer_step"]) * inner for r in rows], [float(r["val_loss_meta"]) for r in rows]


def tables(results, arms, seeds):
    lines = ["| arm | " + " | ".join(label for _, label, _ in METRICS)
             + " | s / inner step |", "|---|" + "---:|" * (len(METRICS) + 1)]
    for arm in arms:
        cells = []
        for key, _, _ in METRICS:
            mean, std = runner._mean_std([results[arm][s][key] for s in seeds])
            cells.append(f"{mean:.4f} +- {std:.4f}")
        seconds = [results[arm][s]["seconds_per_outer_step"] / ARMS[arm][1] for s in seeds]
        cells.append(f"{sum(seconds) / len(seconds):.4f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    same_steps = next((a for a in arms if a not in LONGER), arms[0])
    uniform = [results[same_steps][s]["test_accuracy_uniform"] for s in seeds]
    lines += ["", f"Uniform weights, the same steps (every arm's reference run): test accuracy "
              f"{sum(uniform) / len(uniform):.4f} over the seeds."]
    paired = {}
    if "hyperdistill" in arms:
        lines += ["", "Paired difference, hyperdistill - arm (same seed; mean [95% t interval]):",
                  "", "| against | " + " | ".join(label for _, label, _ in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for other in arms:
            if other == "hyperdistill":
                continue
            cells, paired[other] = [], {}
            for key, _, fmt in METRICS:
                d = runner.paired_difference([results["hyperdistill"][s][key] for s in seeds],
                                             [results[other][s][key] for s in seeds])
                paired[other][key] = d
                interval = (f" [{d['ci95'][0]:{fmt}}, {d['ci95'][1]:{fmt}}]"
                            if d["ci95"] else "")
                cells.append(f"{d['mean_difference']:{fmt}}{interval}")
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", paired


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, per_seed in curves.items():
        steps = per_seed[0][0]
        ax.plot(steps, np.mean([losses for _, losses in per_seed], axis=0), label=arm)
    ax.set_xlabel("inner SGD step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Online hypergradients, noisy digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    arms = [a for a in FLAGS.arms]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise app.UsageError(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}")
    seeds = [int(s) for s in FLAGS.seeds]
    total, every = FLAGS.inner_steps_total, FLAGS.hyperdistill_every
    if FLAGS.quick:
        seeds, total, every = seeds[:2], 20, 5
    if total % 5:
        raise app.UsageError(f"--inner_steps_total={total}: must be a multiple of 5")
    extra = [] if FLAGS.weighting == "logits" else [f"--weighting={FLAGS.weighting}"]
    if FLAGS.hyper_lr is not None:
        extra.append(f"--hyper_lr={FLAGS.hyper_lr}")
    if FLAGS.hyperdistill_reference_steps != 100:
        extra.append(f"--hyperdistill_reference_steps={FLAGS.hyperdistill_reference_steps}")
    if FLAGS.hyperdistill_anchor_every:
        extra.append(f"--hyperdistill_anchor_every={FLAGS.hyperdistill_anchor_every}")
    name = (FLAGS.results_name or ("online_hypergradients"
                                   + ("_mwn" if FLAGS.weighting == "mwn" else ""))
            ) + ("_quick" if FLAGS.quick else "")
    runs_dir = os.path.join(FLAGS.output_dir, name)
    results, curves = {}, {}
    for arm in arms:
        results[arm], curves[arm] = {}, []
        for seed in seeds:
            run_dir = os.path.join(runs_dir, f"{arm}_seed{seed}")
            arguments = run_flags(arm, seed, total, FLAGS.hyperdistill_gamma, every, extra)
            results[arm][seed] = run_one(run_dir, arguments)
            curves[arm].append(validation_curve(run_dir, ARMS[arm][1]))
            runner.log(f"{arm} seed {seed}: test accuracy "
                       f"{results[arm][seed]['test_accuracy_meta']:.4f}")
    table, paired = tables(results, arms, seeds)
    command = " ".join(["python -m benchmarks.online_hypergradients", *non_default_flags()])
    header = (f"# Online hypergradients on noisy digits\n\n`{command}`: {FLAGS.weighting} "
              f"weighting, {total} inner steps, seeds {', '.join(map(str, seeds))}, "
              f"HyperDistill gamma {FLAGS.hyperdistill_gamma}, a reference every {every} steps.\n\n")
    print(header + table)
    with open(os.path.join(FLAGS.output_dir, f"{name}.md"), "w") as f:
        f.write(header + table)
    runner.write_json(os.path.join(FLAGS.output_dir, f"{name}.json"),
                      {"inner_steps_total": total, "seeds": seeds, "weighting": FLAGS.weighting,
                       "app_flags": extra, "per_seed": results,
                       "paired_hyperdistill_minus": paired})
    plot(curves, os.path.join(FLAGS.output_dir, f"{name}.png"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
