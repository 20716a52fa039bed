r"""Task meta-learners at an equal meta-training wall-clock (experiment 6).

    python -m benchmarks.task_meta_learning                       # few-shot digits, 5 seeds
    python -m benchmarks.task_meta_learning --setting=many_shot   # 100-shot, 100 inner steps
    python -m benchmarks.task_meta_learning --setting=molecules   # GIN, RDKit property tasks
    python -m benchmarks.task_meta_learning --setting=fashion_mnist  # 28x28, 4 conv blocks
    python -m benchmarks.task_meta_learning --quick               # tiny sizes, a smoke run

The app (apps/task_meta_learning.py) gives every arm the same number of meta-steps; their
costs per meta-step differ by 100x, so that comparison favours the expensive methods. Here
every arm gets the same meta-training seconds instead:

1. calibration: one app run on seed 0, every arm for --calibration_steps meta-steps
   (checkpoints every quarter of them); an arm's cost is the median seconds per meta-step of
   its chunks after the first (the first holds the tracing);
2. each arm's meta-steps = max(1, round(--budget_seconds / its cost)); scratch does not
   meta-train (1 no-op step);
3. one app run with those counts (--meta_steps_per_arm) over --seeds, arms paired by seed
   (same initialisation, same episodes, same test tasks).

Reported: per arm the calibrated cost, the meta-steps given, and what the run really took
(mean over seeds): its seconds per meta-step, its meta-training seconds (every chunk at its
measured rate; the budget is met as well as the calibration predicts the run) and, apart,
the seconds of the step that traced the step functions (once per arm and process), meta-test
accuracy (molecules: AUROC), paired differences to scratch and the comparisons the papers
claim (WarpGrad - Reptile, WarpGrad - first-order MAML, CTS - Reptile), each with a 95% t
interval over seeds. Settings (fixed before any run, the README's experiment 6 runs):

- few_shot: scikit-learn digits, --rotations=4 (40 classes, 20 held out), 2 conv blocks,
  5-way 1-shot training tasks, 5 inner steps; test 200 tasks at 1 and 5 shots, 10 steps;
- many_shot: the same classes, 100 examples per class in minibatches of 25, 100 inner steps
  (train and test), 100 test tasks at 100 shots; second-order MAML left out (it would
  backpropagate through 100 steps);
- molecules: 2-way (inactive / active) property tasks of 2,000 RDKit-shipped molecules, 40
  held-out tasks, a 3-layer GIN of width 64, 5-shot training tasks, 5 inner steps at 0.1,
  WarpGrad's warp step 0.01 (at the authors' 0.1 its meta-training diverges here; chosen on
  the meta-training losses, README experiment 6); test 100 tasks at 5 and 10 shots, 10
  steps, query AUROC;
- fashion_mnist: Fashion-MNIST (5 of its 10 classes held out), 4 conv blocks of width 32,
  5-way 1-shot training tasks, 5 inner steps; first-order MAML, Reptile and WarpGrad (warps at
  the authors' 0.1, initialisation step 0.02 as on digits) against scratch, 3 seeds, 45 s per
  arm; test 200 tasks at 1 and 5 shots, 10 steps.

Writes <output_dir>/task_meta_learning_<setting>.{md,json,png}; the runs stay under
<output_dir>/task_meta_learning_equal_time/<setting>/ (resumable: the app reuses finished
(arm, seed) runs made with the same settings).
"""

import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

from apps import runner

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "task_meta_learning.py")

SETTINGS = {
    "few_shot": {
        "flags": ["--family=digits", "--rotations=4", "--blocks=2", "--warpgrad_init_lr=0.02",
                  "--test_shots=1,5", "--test_episodes=200"],
        "arms": ["scratch", "pretrain_finetune", "maml", "fomaml", "reptile", "aruba", "cts",
                 "warpgrad"],
        "seeds": ["0", "1", "2", "3", "4"], "budget_seconds": 20.0, "calibration_steps": 40},
    "many_shot": {
        "flags": ["--family=digits", "--rotations=4", "--blocks=2", "--k_shot=100",
                  "--inner_batch=25", "--inner_steps=100", "--cts_meta_step_size=0.01",
                  "--warpgrad_points=10", "--warpgrad_init_lr=0.01", "--test_shots=100",
                  "--test_inner_steps=100", "--test_episodes=100"],
        "arms": ["scratch", "pretrain_finetune", "fomaml", "reptile", "aruba", "cts",
                 "warpgrad"],
        "seeds": ["0", "1", "2"], "budget_seconds": 100.0, "calibration_steps": 8},
    "molecules": {
        "flags": ["--family=molecules", "--n_way=2", "--num_molecules=2000",
                  "--num_test_tasks=40", "--k_shot=5", "--inner_lr=0.1", "--warp_lr=0.01",
                  "--test_shots=5,10", "--test_episodes=100"],
        "arms": ["scratch", "pretrain_finetune", "maml", "fomaml", "reptile", "aruba", "cts",
                 "warpgrad"],
        "seeds": ["0", "1", "2", "3", "4"], "budget_seconds": 20.0, "calibration_steps": 40},
    "fashion_mnist": {
        "flags": ["--family=fashion_mnist", "--warpgrad_init_lr=0.02", "--test_shots=1,5",
                  "--test_episodes=200"],
        "arms": ["scratch", "fomaml", "reptile", "warpgrad"],
        "seeds": ["0", "1", "2"], "budget_seconds": 45.0, "calibration_steps": 12},
}
QUICK_FLAGS = ["--family=digits", "--width=4", "--blocks=1", "--n_way=2", "--k_shot=1",
               "--n_query=2", "--inner_steps=2", "--meta_batch=2", "--test_n_query=2",
               "--test_episodes=3", "--test_inner_steps=2", "--test_shots=1"]
# the papers' claims: (arm, reference arm)
CLAIMS = (("warpgrad", "reptile"), ("warpgrad", "fomaml"), ("cts", "reptile"))

flags.DEFINE_enum("setting", "few_shot", list(SETTINGS), "Which preset (see the docstring).")
flags.DEFINE_list("arms", None, "Arms (default: the setting's); scratch is always added, as "
                  "the baseline.")
flags.DEFINE_list("seeds", None, "Seeds (default: the setting's: 5 few-shot and molecules, "
                  "3 many-shot).")
flags.DEFINE_float("budget_seconds", None, "Meta-training seconds per arm and seed (default: "
                   "the setting's, 20 few-shot and molecules, 100 many-shot).",
                   lower_bound=0.001)
flags.DEFINE_integer("calibration_steps", None, "Meta-steps per arm of the calibration run "
                     "(>= 4, in 4 chunks; default: the setting's, 40 few-shot and molecules, "
                     "8 many-shot).",
                     lower_bound=4)
flags.DEFINE_bool("quick", False, "Tiny sizes (2-way, width 4, 3 test tasks): a smoke run.")
flags.DEFINE_string("app_flags", "", "Extra flags for apps/task_meta_learning.py, one string "
                    "split as a shell would (e.g. '--width=16 --test_shots=1,5'); not "
                    "--output_dir, --arms, --seeds, --meta_steps or --meta_steps_per_arm, "
                    "which the benchmark sets.")
OWN_FLAGS = ("--output_dir", "--arms", "--seeds", "--meta_steps", "--meta_steps_per_arm")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where the report and the runs go.")


def run_app(output_dir, *flags_):
    """Runs the app; returns its summary.json and its records {(arm, seed): record}."""
    # --verbose=2: a log line per checkpoint (no per-step progress bar inside the timing)
    cmd = [sys.executable, APP, f"--output_dir={output_dir}", "--verbose=2", "--noplot",
           *flags_]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.load(open(os.path.join(output_dir, "summary.json")))
    records = {}
    results = os.path.join(output_dir, "results")
    for name in os.listdir(results):
        record = json.load(open(os.path.join(results, name)))
        records[(record["arm"], int(record["seed"]))] = record
    return summary, records


def calibrated_steps(costs, budget):
    """{arm: meta-steps}: max(1, round(budget / seconds per meta-step)); scratch 1."""
    return {arm: 1 if arm == "scratch" else max(1, int(round(budget / cost)))
            for arm, cost in costs.items()}


def comparison(per_seed, arm, reference, mode):
    """Paired difference arm - reference over the seeds both have (None if either misses)."""
    if arm not in per_seed or reference not in per_seed:
        return None
    seeds = sorted(set(per_seed[arm]) & set(per_seed[reference]))
    return runner.paired_difference([per_seed[arm][s][mode] for s in seeds],
                                    [per_seed[reference][s][mode] for s in seeds])


def fmt_paired(p):
    return "-" if p is None else runner.format_paired(p)


def metric_name(app_flags):
    """The app's test metric for these flags: AUROC for the molecule family, else accuracy."""
    family = [f for f in app_flags if f.startswith("--family=")]
    return "AUROC" if family and family[-1] == "--family=molecules" else "accuracy"


def report(setting, shots, costs, steps, budget, summary, records, command,
           metric="accuracy"):
    import numpy as np
    modes = [f"{k}shot" for k in shots]
    arms = [a for a in summary if isinstance(summary[a], dict) and "per_seed" in summary[a]]
    per_seed = {a: summary[a]["per_seed"] for a in arms}

    def per_arm(field):
        return {a: [r[field] for (arm, _), r in records.items() if arm == a] for a in arms}
    spent, run_cost, tracing = (per_arm(f) for f in ("meta_training_seconds",
                                                      "seconds_per_meta_step",
                                                      "tracing_seconds"))
    lines = [f"## Task meta-learners at an equal meta-training wall-clock ({setting})", "",
             f"`{command}`; budget {budget:g} s of meta-training per arm and seed; seeds "
             f"{', '.join(sorted(per_seed[arms[0]]))}; mean +- std over seeds, paired "
             "differences with 95% t intervals over seeds.", "",
             "| arm | s / meta-step (calibration) | meta-steps | s / meta-step (run) | "
             "meta-training s | tracing s | "
             + " | ".join(f"{k}-shot {metric} | vs scratch [95% CI]" for k in shots) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(shots)]
    for a in arms:
        cells = [f"{costs.get(a, float('nan')):.4f}", str(steps[a]),
                 f"{np.mean(run_cost[a]):.4f}", f"{np.mean(spent[a]):.1f}",
                 f"{np.mean(tracing[a]):.1f}"]
        for m in modes:
            values = [per_seed[a][s][m] for s in sorted(per_seed[a])]
            cells += [f"{np.mean(values):.4f} +- {np.std(values):.4f}",
                      "" if a == "scratch" else fmt_paired(comparison(per_seed, a, "scratch",
                                                                      m))]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    claims = {}
    lines += ["", "| the papers' claim, paired by seed | "
              + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---:|" * len(shots)]
    for arm, reference in CLAIMS:
        found = [comparison(per_seed, arm, reference, m) for m in modes]
        if all(f is None for f in found):
            continue
        claims[f"{arm}-{reference}"] = dict(zip(modes, found))
        lines.append(f"| {arm} - {reference} | " + " | ".join(fmt_paired(f) for f in found)
                     + " |")
    payload = {"setting": setting, "budget_seconds": budget, "calibration_seconds": costs,
               "meta_steps": steps, "meta_training_seconds": spent,
               "seconds_per_meta_step": run_cost, "tracing_seconds": tracing,
               "per_seed": per_seed, "metric": metric,
               "claims": claims, "command": command}
    return "\n".join(lines) + "\n", payload


def plot(payload, shots, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, len(shots), figsize=(5 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for arm, seeds in payload["per_seed"].items():
            values = [seeds[s][f"{k}shot"] for s in sorted(seeds)]
            x = np.mean(payload["meta_training_seconds"][arm])
            ax.errorbar(x, np.mean(values), yerr=np.std(values), fmt="o", capsize=3)
            ax.annotate(arm, (x, np.mean(values)), textcoords="offset points", xytext=(4, 4))
        ax.axvline(payload["budget_seconds"], color="gray", ls="--", lw=1, label="budget")
        ax.set(xlabel="meta-training seconds per run (measured)",
               ylabel=f"meta-test {payload.get('metric', 'accuracy')} (mean +- std over seeds)",
               title=f"{k}-shot")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{payload['setting']}: equal meta-training wall-clock")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    preset = SETTINGS[FLAGS.setting]
    arms = list(FLAGS.arms or preset["arms"])
    if "scratch" not in arms:
        arms.insert(0, "scratch")
    seeds = FLAGS.seeds or (["0", "1"] if FLAGS.quick else preset["seeds"])
    budget = FLAGS.budget_seconds or (0.5 if FLAGS.quick else preset["budget_seconds"])
    calibration = FLAGS.calibration_steps or (4 if FLAGS.quick else preset["calibration_steps"])
    extra = shlex.split(FLAGS.app_flags)
    taken = [f for f in extra if f.split("=", 1)[0] in OWN_FLAGS]
    if taken:
        raise app.UsageError(f"--app_flags: {' '.join(taken)} is set by the benchmark itself")
    app_flags = (QUICK_FLAGS if FLAGS.quick else preset["flags"]) + extra
    shots = next(f.split("=", 1)[1] for f in reversed(app_flags)
                 if f.startswith("--test_shots=")).split(",")
    stem = f"task_meta_learning_{FLAGS.setting}" + ("_quick" if FLAGS.quick else "")
    base = os.path.join(FLAGS.output_dir, "task_meta_learning_equal_time", stem)

    _, calibration_records = run_app(
        os.path.join(base, "calibration"), *app_flags, f"--arms={','.join(arms)}",
        "--seeds=0", f"--meta_steps={calibration}",
        f"--checkpoint_every={calibration // 4}", "--test_episodes=1")
    # the app's own cost per meta-step: the median over the chunks after the first
    costs = {arm: calibration_records[(arm, 0)]["seconds_per_meta_step"] for arm in arms}
    steps = calibrated_steps(costs, budget)
    per_arm = ",".join(f"{arm}:{n}" for arm, n in steps.items())
    summary, records = run_app(os.path.join(base, "runs"), *app_flags, f"--arms={','.join(arms)}",
                               f"--seeds={','.join(seeds)}", f"--meta_steps_per_arm={per_arm}")
    # only this run's (arm, seed)s: the results folder may hold others from earlier runs
    records = {(a, s): r for (a, s), r in records.items() if a in arms and str(s) in seeds}
    # the command as given: the setting and every flag set away from its default
    given = [f"--{name}={','.join(value) if isinstance(value, list) else value}"
             for name, value in (("arms", FLAGS.arms), ("seeds", FLAGS.seeds),
                                 ("budget_seconds", FLAGS.budget_seconds),
                                 ("calibration_steps", FLAGS.calibration_steps))
             if value is not None]
    command = " ".join(["python -m benchmarks.task_meta_learning",
                        f"--setting={FLAGS.setting}"] + (["--quick"] if FLAGS.quick else [])
                       + given + ([f"--app_flags={shlex.quote(FLAGS.app_flags)}"]
                                  if FLAGS.app_flags else []))
    markdown, payload = report(FLAGS.setting, shots, costs, steps, budget, summary, records,
                               command, metric_name(app_flags))
    runner.write_report(FLAGS.output_dir, stem, markdown, payload)
    plot(payload, shots, os.path.join(FLAGS.output_dir, f"{stem}.png"))
    print(markdown)


if __name__ == "__main__":
    app.run(main)
