r"""Experiment 2 as a benchmark on Fashion-MNIST: (a) no PT, (b) SimCLR with the fixed
augmentations, a sweep of SimCLR with the warp at fixed strengths (the ground truth for the
direction), (c) SimCLR with the meta-learned warp, and (c-online) the same with
HyperDistill's online PT stage in place of the one-term Neumann solve, every arm paired by
seed.

    python -m benchmarks.simclr_augment            # CPU-sized subset, 5 seeds
    python -m benchmarks.simclr_augment --quick    # a smoke run on IDX files written by the test

CPU-sized subset (the defaults, passed to apps/simclr_augment.py): PT on 3,000 training images
(a seeded subset; labels unused), 4 PT epochs, batch 128 (256 views); labelled FT data: 0.5% of
the 60,000 training images (300: 150 MetaTrain + 150 MetaVal; linear evaluation and full FT use
all 300), 30 FT epochs; test: the first 2,000 test images. Small CNN encoder, projection
128->256->128, NT-Xent temperature 0.5, per-example crop and flip. The meta arm (the app's
defaults): hyperstep every 5 PT steps (K=1, i=1), strength starting at 0.05 with Adam 0.1 on
rho, per-example magnitudes at Adam 1e-4. The online meta arm (meta_online, the app's
--hyperdistill_* defaults): PT steps modelled as SGD at the PT rate, gamma 0.99, the line's start
moved and a 20-step reference taken every 25 PT steps. Every arm gets the same PT and FT
budget.

The sweep's best region: the fixed strengths (0 = plain SimCLR) whose paired difference to
the best one (by mean test AUROC) has a 95% interval that includes 0; it is reported per
evaluation with the meta arm's final strengths (inside: between the region's smallest and
largest strength; the strength is never 0, so a region of 0 alone counts strengths below
half the smallest fixed one). The test set judges; nothing is tuned on it.
The cost of meta-PT over plain SimCLR is the ratio of their PT examples/s (epochs that
compile nothing). Resumable: finished runs are kept under benchmarks/results/simclr_augment/.
Writes benchmarks/results/simclr_augment.{md,json}.
"""

import json
import os
import subprocess
import sys

import numpy as np

from absl import app, flags

from apps import runner

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (>= 5 for paired intervals "
                  "worth reading).")
flags.DEFINE_string("images_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_integer("num_pt", 3000, "PT images.")
flags.DEFINE_float("label_fraction", 0.005, "Labelled fraction of the 60,000 training images.")
flags.DEFINE_integer("pt_epochs", 4, "PT epochs.")
flags.DEFINE_list("arms", ["no_pt", "simclr", "fixed_0.02", "fixed_0.05", "fixed_0.1",
                           "fixed_0.2", "meta", "meta_online"],
                  "Arms of apps/simclr_augment.py; the sweep is simclr (strength 0) and the "
                  "fixed_<s> arms.")
flags.DEFINE_integer("ft_epochs", 30, "Linear-evaluation and fine-tuning epochs.")
flags.DEFINE_integer("num_test", 2000, "Test images.")
flags.DEFINE_bool("quick", False, "Tiny sizes on --images_dir: a smoke run, not a measurement.")
flags.DEFINE_list("app_flags", [], "Extra flags for apps/simclr_augment.py.")
flags.DEFINE_list("variant_flags", [], "If given, a second meta arm, meta_variant: the app's "
                  "meta arm again with these extra flags (e.g. --solver_iterations=5,"
                  "--neumann_alpha=0.03), same seeds and budget, paired with the same arms.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where simclr_augment.md/.json and the runs go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("linear", "full")  # the app's fine-tuning modes, in its table order


def main(argv):
    del argv
    run_dir = os.path.join(FLAGS.output_dir, "simclr_augment")
    sizes = [f"--num_pt={FLAGS.num_pt}", f"--label_fraction={FLAGS.label_fraction}",
             f"--pt_epochs={FLAGS.pt_epochs}", f"--ft_epochs={FLAGS.ft_epochs}",
             f"--num_test={FLAGS.num_test}"]
    if FLAGS.quick:
        sizes = ["--num_pt=0", "--label_fraction=0.2", "--pt_epochs=2", "--ft_epochs=1",
                 "--num_test=0", "--batch_size=32", "--ft_batch_size=8", "--hyperstep_every=2"]
    if not {"simclr", "meta"} <= set(FLAGS.arms):
        raise app.UsageError(f"--arms={','.join(FLAGS.arms)}: the report needs simclr and meta")
    summary, records = run_app(run_dir, FLAGS.arms, sizes + FLAGS.app_flags)
    if FLAGS.variant_flags:
        variant, variant_records = run_app(run_dir + "_variant", ["meta"],
                                           sizes + FLAGS.app_flags + FLAGS.variant_flags)
        summary["meta_variant"] = entry = variant["meta"]
        entry.pop("paired", None)
        base = summary["meta"].get("paired", {}).get("baseline")  # the app's --baseline
        if base in summary:
            seeds = [k for k in entry["per_seed"] if k in summary[base]["per_seed"]]
            entry["paired"] = {"baseline": base, **{m: runner.paired_difference(
                [entry["per_seed"][k][m] for k in seeds],
                [summary[base]["per_seed"][k][m] for k in seeds]) for m in MODES}}
        records += [{**r, "arm": "meta_variant"} for r in variant_records]
    meta_eps = summary["meta"]["pt_examples_per_second"]
    simclr_eps = summary["simclr"]["pt_examples_per_second"]
    cost = simclr_eps / meta_eps
    names = {"no_pt": "(a) no PT", "simclr": "(b) SimCLR, fixed augmentations",
             "meta": "(c) SimCLR + meta-learned warp",
             "meta_online": "(c-online) meta-learned warp, HyperDistill's online PT stage",
             "meta_variant": "(c') meta-learned warp, " + " ".join(FLAGS.variant_flags),
             **{arm: f"SimCLR + warp at fixed strength {arm[6:]}" for arm in fixed_arms(summary)}}
    lines = ["## SimCLR with a meta-learned augmentation (Fashion-MNIST)", "",
             f"`python -m benchmarks.simclr_augment{' --quick' if FLAGS.quick else ''}`: "
             + " ".join(sizes) + f"; seeds {', '.join(FLAGS.seeds)}; test AUROC is the macro "
             "average over the 10 classes (one-vs-rest), mean +- std over seeds.", "",
             (runner.summary_table(summary, MODES, names, seeds_column=False)
              + runner.paired_table(summary, MODES, names)).rstrip("\n")]
    strengths = {arm: [r["warp_strength"] for r in sorted(records, key=lambda r: r["seed"])
                       if r["arm"] == arm] for arm in ("meta", "meta_online", "meta_variant")
                 if arm in summary}
    sweep = sweep_regions(summary, strengths)
    online_ratio = (simclr_eps / summary["meta_online"]["pt_examples_per_second"]
                    if "meta_online" in summary else None)
    online_cost = ("" if online_ratio is None else
                   f"; with the online PT stage: {online_ratio:.2f}x")
    lines += ["", f"Cost of meta-PT over plain SimCLR: {cost:.2f}x the time per PT example "
              f"(a fixed-strength warp: {sweep_cost(summary):.2f}x{online_cost}).", ""]
    for arm, values in strengths.items():
        lines += [f"{names[arm]}: strength after PT, per seed: "
                  + ", ".join(f"{v:.4f}" for v in values) + " (initial 0.05).", ""]
    lines += sweep_lines(sweep)
    probe = probe_summary(records)
    lines += [""] + probe_lines(probe, names)
    lines += ["", "Targets: (c) - (b) > 0 with the 95% interval excluding 0 on at least one "
              "evaluation; the meta-learned strength inside the sweep's best region."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "simclr_augment.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "simclr_augment.json"), "w") as f:
        json.dump({"summary": summary, "runs": records, "meta_cost_ratio": cost,
                   "meta_online_cost_ratio": online_ratio,
                   "meta_strengths": strengths, "sweep": sweep, "meta_val_probe": probe,
                   "sizes": sizes,
                   "quick": FLAGS.quick}, f, indent=1)


def run_app(run_dir, arms, app_flags):
    """Runs apps/simclr_augment.py on the images into ``run_dir``; (summary, records)."""
    cmd = [sys.executable, os.path.join(ROOT, "apps", "simclr_augment.py"), "--modality=image",
           f"--images_dir={FLAGS.images_dir}", f"--output_dir={run_dir}",
           f"--saved_models_dir={os.path.join(run_dir, 'saved_models')}", "--verbose=0",
           f"--seeds={','.join(FLAGS.seeds)}", f"--arms={','.join(arms)}", *app_flags]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    return summary, list(runner.load_results(os.path.join(run_dir, "results"), summary,
                                             FLAGS.seeds).values())


def fixed_arms(summary):
    return [arm for arm in summary if arm.startswith("fixed_")]


def sweep_regions(summary, meta_strengths):
    """Per evaluation: the fixed strengths (simclr = 0) by mean AUROC, the best one, the best
    region (paired 95% interval to the best includes 0; one seed: the best alone), and for
    each meta arm of ``meta_strengths`` ({arm: final strengths}) how many fall inside
    [min, max] of the region."""
    arms = [("simclr", 0.0)] * ("simclr" in summary) + [
        (arm, float(arm[6:])) for arm in fixed_arms(summary)]
    if len(arms) < 2:
        return {}
    result = {}
    for mode in MODES:
        means = {arm: summary[arm][f"{mode}_mean"] for arm, _ in arms}
        best = max(means, key=means.get)
        region = []
        for arm, strength in arms:
            seeds = [k for k in summary[arm]["per_seed"] if k in summary[best]["per_seed"]]
            diff = runner.paired_difference([summary[arm]["per_seed"][k][mode] for k in seeds],
                                            [summary[best]["per_seed"][k][mode] for k in seeds])
            if arm == best or (diff["ci95"] is not None and diff["ci95"][1] >= 0):
                region.append(strength)
        low, high = min(region), max(region)
        limit = high if high > 0 else 0.5 * min(s for _, s in arms if s > 0)
        result[mode] = {"mean_auroc": {str(s): means[arm] for arm, s in arms},
                        "best_strength": dict(arms)[best], "region": [low, high],
                        "meta_inside": {arm: sum(low <= m <= limit for m in values)
                                        for arm, values in meta_strengths.items()},
                        "meta_count": {arm: len(v) for arm, v in meta_strengths.items()}}
    return result


def probe_summary(records):
    """Per arm: the MetaVal probe's loss and AUROC (a linear head fitted on MetaTrain, scored
    on MetaVal: what the meta arms' hypergradient aims at), mean and std over seeds."""
    result = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        runs = [r for r in records if r["arm"] == arm and "meta_val_probe_loss" in r]
        if runs:
            result[arm] = {key: {"mean": float(np.mean([r[f"meta_val_probe_{key}"] for r in runs])),
                                 "std": float(np.std([r[f"meta_val_probe_{key}"] for r in runs])),
                                 "seeds": len(runs)} for key in ("loss", "auroc")}
    return result


def probe_lines(probe, names):
    lines = ["| arm | MetaVal probe loss | MetaVal probe AUROC | seeds |", "|---|---:|---:|---:|"]
    for arm, entry in probe.items():
        lines.append(f"| {names.get(arm, arm)} | {entry['loss']['mean']:.4f} +- "
                     f"{entry['loss']['std']:.4f} | {entry['auroc']['mean']:.4f} +- "
                     f"{entry['auroc']['std']:.4f} | {entry['loss']['seeds']} |")
    return lines + ["", "MetaVal probe: a linear head fitted on MetaTrain (frozen encoder), scored "
                    "on MetaVal, the held-out half of the labelled examples that the meta arms' "
                    "hypergradient is computed on (no test example)."]


def sweep_cost(summary):
    """Time per PT example of the fixed-strength warp arms over plain SimCLR."""
    rates = [summary[arm]["pt_examples_per_second"] for arm in fixed_arms(summary)]
    return summary["simclr"]["pt_examples_per_second"] / (sum(rates) / len(rates)) \
        if rates else float("nan")


def sweep_lines(sweep):
    if not sweep:
        return ["(No sweep: run the simclr and fixed_* arms.)"]
    lines = ["| evaluation | mean test AUROC by fixed strength | best | best region | "
             "meta strengths inside |", "|---|---|---:|---|---|"]
    for mode, entry in sweep.items():
        by_strength = ", ".join(f"{s}: {v:.4f}" for s, v in entry["mean_auroc"].items())
        low, high = entry["region"]
        inside = ", ".join(f"{arm}: {entry['meta_inside'][arm]} of {entry['meta_count'][arm]}"
                           for arm in entry["meta_inside"])
        lines.append(f"| {runner.FT_MODES[mode][1]} | {by_strength} | {entry['best_strength']} | "
                     f"[{low}, {high}] | {inside} |")
    return lines


if __name__ == "__main__":
    app.run(main)
