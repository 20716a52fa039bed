r"""Experiment 1 as a benchmark: no PT, uniform-weight PT, oracle PT (real tasks only) and
meta-learned task weights, with the implicit PT stage (meta: Neumann) and with HyperDistill's
online term over the PT run (meta_online: the app's --hyperdistill_* defaults).

    python -m benchmarks.multitask_graphs               # CPU-sized default, 5 seeds
    python -m benchmarks.multitask_graphs --full        # the app's --full preset (GPU)

Runs apps/multitask_pt.py on the embedded benchmark (RDKit-shipped PT molecules and the FT
training molecules, with fragment, Morgan-bit and descriptor tasks of which --app_flags'
--permuted_task_fraction (default 25%) are permuted controls; CHEMBL2321810 FT task, scaffold
split) for --seeds, arms paired by seed (paired differences with 95% t intervals, to uniform
and meta_online - meta), and reports how well each meta arm's weights find the permuted tasks
(AUROC of the weights for "task is real", mean weight per family, hypergradient agreement
across batches). The control tasks are
chosen once (by the split seed), so the intervals over seeds leave out the choice of control
set. Then the PT arms once more with and without XLA for throughput (the app's --xla, which
leaves op determinism off; 4 PT epochs; examples/s over the epochs that compile nothing: after
the first for uniform PT, after warm-up and the first hyperstep epoch for meta-PT). Resumable:
finished runs are kept under benchmarks/results/multitask_graphs/. Writes
benchmarks/results/multitask_graphs.{md,json}.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from apps import runner

FLAGS = flags.FLAGS
flags.DEFINE_string("diagnose", None, "An apps/multitask_pt.py output directory: write the "
                    "diagnostics table of its meta arms (from the per-seed records under its "
                    "results/, e.g. a run with --agreement_batches=64 for the per-task t tests) "
                    "to <dir>/diagnostics.md, with the plot hypergradient_t_<arm>.png of every "
                    "task's t where the records hold it; print it, and run nothing else.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (>= 5 for paired intervals worth "
                  "reading).")
flags.DEFINE_bool("full", False, "Use the app's --full preset.")
flags.DEFINE_list("app_flags", [], "Extra flags passed to apps/multitask_pt.py (e.g. --hidden=128).")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where multitask_graphs.md/.json and the runs go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("full", "linear")  # the app's fine-tuning modes, in its table order
META_ARMS = ("meta", "meta_online")


def run_app(output_dir, *flags_):
    cmd = [sys.executable, os.path.join(ROOT, "apps", "multitask_pt.py"), f"--output_dir={output_dir}",
           f"--saved_models_dir={os.path.join(output_dir, 'saved_models')}", "--verbose=0",
           *(["--full"] if FLAGS.full else []), *FLAGS.app_flags, *flags_]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.load(open(os.path.join(output_dir, "summary.json")))


def mean_interval(values):
    """(mean, [low, high]) with the 95% Student-t interval (None below 2 values)."""
    out = runner.paired_difference(values, [0.0] * len(values))
    return out["mean_difference"], out["ci95"]


def meta_diagnostics(records, arm="meta"):
    """Markdown rows on a meta arm's task weights from its per-seed records."""
    def cell(values, digits=3):
        mean, ci = mean_interval(values)
        return f"{mean:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
    lines = [f"| {arm} arm, over seeds | mean [95% t interval] |", "|---|---:|",
             f"| AUROC of the learned weights for \"task is real\" | "
             f"{cell([r['task_weight_auroc_real'] for r in records])} |",
             f"| AUROC of \\|weight - 1\\| for \"task is real\" (real tasks moved further) | "
             f"{cell([r['task_weight_moved_auroc_real'] for r in records])} |"]
    if all("hyperdistill_scale" in r for r in records):
        lines.append("| HyperDistill's fitted scale theta at the end | "
                     f"{cell([r['hyperdistill_scale'] for r in records])} |")
    if all("hypergradient_agreement" in r for r in records):
        for key, label in (("mean_cosine", "hypergradient cosine between batches"),
                           ("mean_centred_cosine", "the same, each centred over tasks"),
                           ("same_sign_share", "share of tasks with one hypergradient sign"),
                           # the t tests of each task's mean hypergradient (from 3 batches on)
                           ("real_significant_share", "share of real tasks whose expected "
                            "hypergradient is not 0 (t test, 5%)"),
                           ("permuted_significant_share", "share of permuted tasks whose "
                            "expected hypergradient is not 0 (t test, 5%)"),
                           ("real_significant_raised_share", "of the real tasks that pass the "
                            "test, the share whose weight rises in expectation (mean < 0)"),
                           ("significant_weight_follows_share", "of all tasks that pass the "
                            "test, the share whose weight moved from 1 the way -mean points"),
                           ("expected_direction_auroc_real", "AUROC of -t for \"task is real\" "
                            "(where the weights head)"),
                           ("expected_size_auroc_real", "AUROC of \\|t\\| for \"task is real\" "
                            "(how sure the move is)")):
            values = [r["hypergradient_agreement"][key] for r in records
                      if key in r["hypergradient_agreement"]]
            if values:  # a row over fewer seeds says how many
                count = f" ({len(values)} of {len(records)} seeds)" \
                    if len(values) < len(records) else ""
                lines.append(f"| {label}{count} | {cell(values)} |")
    spread = [r["task_weight_history"][-1]["quantiles"] for r in records]
    lines.append("| final weights 10% / 50% / 90% quantile (mean) | " + " / ".join(
        f"{sum(q[k] for q in spread) / len(spread):.3f}" for k in ("10", "50", "90")) + " |")
    for group in records[0]["mean_task_weight"]:
        lines.append(f"| mean weight, {group} tasks | "
                     f"{cell([r['mean_task_weight'][group] for r in records])} |")
    return "\n".join(lines) + "\n"


def online_against_implicit(comparison):
    """Markdown row: meta_online - meta per fine-tuning mode, paired by seed (95% t interval)."""
    seeds = sorted(set(comparison["meta"]["per_seed"])
                   & set(comparison["meta_online"]["per_seed"]))

    def cell(mode):
        diff = runner.paired_difference(
            [comparison["meta_online"]["per_seed"][s][mode] for s in seeds],
            [comparison["meta"]["per_seed"][s][mode] for s in seeds])
        ci = diff["ci95"]
        return f"{diff['mean_difference']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
    return ("| meta_online - meta, paired by seed | full FT test AUROC | linear eval test AUROC |\n"
            "|---|---:|---:|\n| mean [95% t interval] | " + " | ".join(cell(m) for m in MODES)
            + " |\n")


def task_t_points(records):
    """Per task, pooled over the records (seeds): (t of its mean hypergradient, learned weight,
    is_real), from records holding ``hypergradient_agreement["task_t"]``; tasks in the
    records' task order (the order of ``task_weights``, which the t values follow)."""
    t, weight, real = [], [], []
    for record in records:
        names = list(record["task_weights"])
        permuted = set(record.get("permuted_tasks", ()))
        t += record["hypergradient_agreement"]["task_t"]
        weight += [record["task_weights"][n] for n in names]
        real += [n not in permuted for n in names]
    return np.array(t), np.array(weight), np.array(real, bool)


def plot_task_t(records, path, arm):
    """Two panels of every task of every seed: the histogram of t (its mean hypergradient
    over the agreement batches against 0) for real and permuted tasks, and t against the
    learned weight; the 5% cutoffs dashed. Writes ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats
    t, weight, real = task_t_points(records)
    batches = records[0]["hypergradient_agreement"]["batches"]
    cutoff = stats.t.ppf(0.975, batches - 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(t.min(), t.max(), 41)
    for mask, label, color in ((real, "real", "C0"), (~real, "permuted", "C3")):
        left.hist(t[mask], bins=bins, density=True, alpha=0.55, color=color,
                  label=f"{label} ({mask.sum()})")
        right.scatter(t[mask], weight[mask], s=6, alpha=0.5, color=color, label=label)
    for ax in (left, right):
        for x in (-cutoff, cutoff):
            ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.set_xlabel("t of the mean hypergradient (< 0: the weight rises in expectation)")
    left.set_ylabel("density")
    left.legend()
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("learned task weight")
    right.legend()
    fig.suptitle(f"{arm}: {len(records)} seeds x {len(t) // len(records)} tasks, "
                 f"{batches} batches each; dashed: 5% two-sided cutoffs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnose(run_dir):
    """The diagnostics tables of the meta arms of an app run directory, written to
    <run_dir>/diagnostics.md, and, where the records hold every task's t, the plot
    <run_dir>/hypergradient_t_<arm>.png (`plot_task_t`); returns the markdown. Refuses
    (UsageError, naming the files) a record it cannot read, and records of one arm made with
    different settings."""
    results = os.path.join(run_dir, "results")
    tables = []
    for arm in META_ARMS:
        names = [n for n in (os.listdir(results) if os.path.isdir(results) else [])
                 if n.startswith(f"{arm}_seed") and n.endswith(".json")]
        if not names:
            continue
        records = []
        for name in names:
            path = os.path.join(results, name)
            try:
                with open(path) as f:
                    record = json.load(f)
                int(record["seed"])  # every record names its seed
            except (ValueError, KeyError, TypeError) as error:
                raise app.UsageError(f"--diagnose: cannot read {path}: {error!r}") from error
            records.append(record)
        records.sort(key=lambda r: r["seed"])
        settings = {r.get("config_sha256") for r in records}
        if len(settings) > 1:
            raise app.UsageError(f"--diagnose: the {arm} records under {results} were made "
                                 f"with {len(settings)} different settings (config_sha256)")
        seeds = ",".join(str(r["seed"]) for r in records)
        tables.append(f"Seeds {seeds}.\n\n" + meta_diagnostics(records, arm))
        if all("task_t" in r.get("hypergradient_agreement", {}) for r in records):
            plot_task_t(records, os.path.join(run_dir, f"hypergradient_t_{arm}.png"), arm)
    if not tables:
        raise app.UsageError(f"--diagnose={run_dir}: no meta arm records under {results}")
    report = "\n".join(tables)
    with open(os.path.join(run_dir, "diagnostics.md"), "w") as f:
        f.write(report)
    return report


def main(argv):
    del argv
    if FLAGS.diagnose:
        print(diagnose(FLAGS.diagnose))
        return
    base = os.path.join(FLAGS.output_dir, "multitask_graphs")
    comparison = run_app(os.path.join(base, "comparison"), f"--seeds={','.join(FLAGS.seeds)}",
                         "--arms=no_pt,uniform,oracle," + ",".join(META_ARMS))
    throughput = {}
    for xla in (True, False):
        summary = run_app(os.path.join(base, f"throughput_{'xla' if xla else 'noxla'}"),
                          "--seeds=0", "--arms=uniform," + ",".join(META_ARMS), "--ft_epochs=1",
                          "--pt_epochs=4",
                          "--xla" if xla else "--noxla")
        throughput["xla" if xla else "no_xla"] = {arm: summary[arm]["pt_examples_per_second"]
                                                  for arm in ("uniform", *META_ARMS)}
    lines = ["## Multitask graph PT benchmark (embedded RDKit molecules)", "",
             f"`python -m benchmarks.multitask_graphs{' --full' if FLAGS.full else ''}`; seeds "
             f"{','.join(FLAGS.seeds)}; test AUROC on the scaffold-split CHEMBL2321810 test set.", "",
             (runner.summary_table(comparison, MODES, seeds_column=False, rate_column=False)
              + runner.paired_table(comparison, MODES)).rstrip("\n"), "",
             online_against_implicit(comparison).rstrip("\n")]
    meta_records = {arm: [json.load(open(os.path.join(base, "comparison", "results",
                                                      f"{arm}_seed{seed}.json")))
                          for seed in FLAGS.seeds] for arm in META_ARMS}
    for arm in META_ARMS:
        lines += ["", meta_diagnostics(meta_records[arm], arm).rstrip("\n")]
    lines += ["", "| PT throughput (examples/s, CPU) | XLA | no XLA |", "|---|---:|---:|"]
    for arm in ("uniform", *META_ARMS):
        lines.append(f"| {arm} | {throughput['xla'][arm]:.0f} | {throughput['no_xla'][arm]:.0f} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    with open(os.path.join(FLAGS.output_dir, "multitask_graphs.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "multitask_graphs.json"), "w") as f:
        json.dump({"comparison": comparison, "throughput": throughput, "seeds": FLAGS.seeds,
                   "meta_weights": {arm: [{k: r[k] for k in (
                       "seed", "task_weight_auroc_real", "task_weight_moved_auroc_real",
                       "hypergradient_agreement", "mean_task_weight", "task_weight_history",
                       "hyperdistill_scale", "hyperdistill_references") if k in r}
                       for r in records] for arm, records in meta_records.items()},
                   "full": FLAGS.full}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
