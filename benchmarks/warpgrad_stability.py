r"""WarpGrad's meta-training at several warp steps: whether it stays bounded, and what the warp
layers become.

    python -m benchmarks.warpgrad_stability           # molecules, warp steps 0.1, 0.03, 0.01
    python -m benchmarks.warpgrad_stability --quick   # tiny digits, a smoke run

Meta-trains the task app's WarpGrad arm (apps/task_meta_learning.py: the same family, task
split, episodes and learner, built by the app's own functions; every app flag is accepted,
and the defaults are the README's molecule few-shot settings) for --meta_steps meta-steps
at each of --warp_lrs, from one seed (--seed: the same initialisation and episodes for every
warp step). Only meta-training tasks are used: nothing here looks at the meta-test tasks, so
a warp step chosen from this table is not tuned on them.

Every --every meta-steps it records the mean over those meta-steps of WarpGrad's metrics
(support loss at the initialisation phi, warp objective, distance travelled by adaptation)
and each warp layer's largest and smallest singular value (its kernel reshaped to
[-1, outputs]; an identity warp has both at 1). Writes warpgrad_stability.{md,json,png} under
--report_dir; the app's label cache goes to <report_dir>/warpgrad_stability_cache.
Cost: --meta_steps WarpGrad meta-steps per warp step (about 1 s each for the molecule GIN on
2 CPU cores).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from apps import runner  # noqa: E402
from apps import task_meta_learning as task_app  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("warp_lrs", ["0.1", "0.03", "0.01"], "Warp steps (WarpGrad's SGD step on "
                  "the warp layers) to compare; the app's --warp_lr is ignored.")
flags.DEFINE_integer("seed", 0, "The seed of the initialisation and of the episodes.")
flags.DEFINE_integer("every", 25, "Meta-steps per row of the table.", lower_bound=1)
flags.DEFINE_string("report_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"), "Where the report goes.")
flags.DEFINE_bool("quick", False, "Tiny digits settings (2-way, width 4, 4 meta-steps).")
# the README's molecule few-shot settings (experiment 6)
for name, value in (("family", "molecules"), ("n_way", 2), ("num_test_tasks", 40),
                    ("k_shot", 5), ("inner_lr", 0.1), ("test_shots", ["5", "10"])):
    FLAGS.set_default(name, value)
QUICK = {"family": "digits", "width": 4, "blocks": 1, "n_way": 2, "k_shot": 1, "n_query": 2,
         "inner_steps": 2, "meta_batch": 2, "meta_steps": 4, "test_shots": ["1"],
         "num_test_classes": 5}
METRICS = ("support_loss", "warp_objective", "distance")


def singular_values(warps):
    """[(largest, smallest)] singular value of each warp kernel, reshaped to [-1, outputs]."""
    import numpy as np
    out = []
    for kernel in warps:
        kernel = np.asarray(kernel, np.float64)
        values = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)
        out.append((float(values[0]), float(values[-1])))
    return out


def meta_train(config, family, warp_lr, meta_steps, every, seed):
    """Rows every ``every`` meta-steps: step, mean metrics, warps' singular values; and the
    final warp kernels."""
    import numpy as np
    import tensorflow as tf
    runner.seed_everything(seed)
    learner, _ = task_app.make_learner("warpgrad", seed, dataclasses.replace(
        config, warp_lr=warp_lr), family)
    rows, window, start = [], [], time.perf_counter()
    for step in range(meta_steps):
        support, support_labels, query, query_labels, _ = task_app.meta_batch(
            family, config, seed, step)
        metrics = learner.meta_step(
            task_app.support_batches(family, support, support_labels, config,
                                     config.inner_steps, (seed, step)),
            (family.inputs(query), tf.constant(query_labels)))
        window.append({k: float(metrics[k]) for k in METRICS})
        if (step + 1) % every == 0 or step + 1 == meta_steps:
            warps = [v.numpy() for v in learner.warp]
            rows.append({"step": step + 1,
                         **{k: float(np.mean([m[k] for m in window])) for k in METRICS},
                         "singular_values": singular_values(warps)})
            window = []
            runner.log(f"warp step {warp_lr}: meta-step {step + 1}/{meta_steps}, "
                       f"{time.perf_counter() - start:.0f} s, support loss "
                       f"{rows[-1]['support_loss']:.3f}, largest singular value "
                       f"{max(s[0] for s in rows[-1]['singular_values']):.2f}")
    return rows, [w.tolist() for w in warps]


def report(runs, config, meta_steps):
    command = "python -m benchmarks.warpgrad_stability" + " ".join(
        [""] + [a for a in sys.argv[1:] if not a.startswith("--report_dir")])
    lines = ["## WarpGrad's meta-training at several warp steps", "",
             f"`{command}`: family {config.family}, {config.n_way}-way {config.k_shot}-shot, "
             f"{config.inner_steps} inner steps at {config.inner_lr}, meta-batch "
             f"{config.meta_batch}, Leap step {config.warpgrad_init_lr}, seed {FLAGS.seed}, "
             f"{meta_steps} meta-steps; meta-training tasks only. Metrics: mean over the "
             f"meta-steps since the row before; singular values: each warp's largest / "
             f"smallest, layer by layer.", "",
             "| warp step | meta-step | support loss at phi | warp objective | distance | "
             "warp singular values (largest / smallest) |", "|---:|---:|---:|---:|---:|---|"]
    for lr, run in runs.items():
        for row in run["rows"]:
            values = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in row["singular_values"])
            lines.append(f"| {lr} | {row['step']} | {row['support_loss']:.3f} | "
                         f"{row['warp_objective']:.3f} | {row['distance']:.3f} | {values} |")
    return "\n".join(lines) + "\n"


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for lr, run in runs.items():
        steps = [r["step"] for r in run["rows"]]
        axes[0].plot(steps, [r["support_loss"] for r in run["rows"]], marker="o",
                     label=f"warp step {lr}")
        axes[1].plot(steps, [max(s[0] for s in r["singular_values"]) for r in run["rows"]],
                     marker="o", label=f"warp step {lr}")
    axes[0].set(xlabel="meta-step", ylabel="support loss at phi", yscale="log")
    axes[1].set(xlabel="meta-step", ylabel="largest warp singular value", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.quick:
        for name, value in QUICK.items():
            setattr(FLAGS, name, value)
    FLAGS.output_dir = os.path.join(FLAGS.report_dir, "warpgrad_stability_cache")
    config, _ = runner.setup(task_app.Config)
    try:
        warp_lrs = [float(v) for v in FLAGS.warp_lrs]
    except ValueError:
        raise app.UsageError(f"--warp_lrs={','.join(FLAGS.warp_lrs)}: numbers") from None
    if not warp_lrs or min(warp_lrs) <= 0:
        raise app.UsageError(f"--warp_lrs={','.join(FLAGS.warp_lrs)}: positive numbers")
    family = task_app.load_family(config)
    runs = {}
    for lr in warp_lrs:
        rows, warps = meta_train(config, family, lr, config.meta_steps, FLAGS.every,
                                 FLAGS.seed)
        runs[str(lr)] = {"rows": rows, "final_warps": warps}
    text = report(runs, config, config.meta_steps)
    print(text)
    os.makedirs(FLAGS.report_dir, exist_ok=True)
    with open(os.path.join(FLAGS.report_dir, "warpgrad_stability.md"), "w") as f:
        f.write(text)
    with open(os.path.join(FLAGS.report_dir, "warpgrad_stability.json"), "w") as f:
        json.dump({"config": config.results_config_of("warpgrad"), "seed": FLAGS.seed,
                   "every": FLAGS.every, "quick": FLAGS.quick, "runs": runs}, f, indent=1)
    plot(runs, os.path.join(FLAGS.report_dir, "warpgrad_stability.png"))


if __name__ == "__main__":
    app.run(main)
