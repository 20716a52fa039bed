r"""Paired differences between arms of stored app runs (any app whose results folder holds
``<arm>_seed<k>.json`` records), for comparisons across separate runs of an app: a
diagnostic variant run into its own output folder against the arms of a benchmark.

    python -m benchmarks.paired_runs \
        --run=simclr=benchmarks/results/simclr_augment/results:simclr \
        --run=frozen=benchmarks/results/simclr_augment_pipeline/frozen/results:meta \
        --pair=frozen-simclr --keys=test_auroc_linear,meta_val_probe_loss \
        --output=benchmarks/results/simclr_augment_pipeline/paired.md

Each ``--run`` names a label, a results folder and the arm in it; each ``--pair`` A-B gives,
per key, the mean over the seeds both hold of A - B with its 95% Student-t interval
(`apps.runner.paired_difference`), and the per-seed differences. Prints a markdown table and
writes it (and a JSON twin) when ``--output`` is given.
"""

import json
import os

from absl import app, flags

from apps import runner

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", [], "label=results_folder:arm (repeatable).")
flags.DEFINE_multi_string("pair", [], "A-B: labels of two --run's (repeatable).")
flags.DEFINE_list("keys", ["test_auroc_linear", "test_auroc_full"], "Record fields compared.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds looked for.")
flags.DEFINE_string("output", None, "Markdown file to write (and a .json beside it).")


def parse_run(text):
    """'label=folder:arm' -> (label, folder, arm)."""
    label, sep, rest = text.partition("=")
    folder, sep2, arm = rest.rpartition(":")
    if not (sep and sep2 and label and folder and arm):
        raise app.UsageError(f"--run={text}: expected label=results_folder:arm")
    if not os.path.isdir(folder):
        raise app.UsageError(f"--run={text}: no folder {folder}")
    return label, folder, arm


def per_seed_values(folder, arm, seeds):
    """{seed: record} of ``arm`` in ``folder``."""
    return {seed: record for (_, seed), record in
            runner.load_results(folder, [arm], seeds).items()}


def compare(runs, pairs, keys, seeds):
    """[{pair, key, mean_difference, ci95, seeds, per_seed}] for every pair and key."""
    records = {label: per_seed_values(folder, arm, seeds) for label, folder, arm in runs}
    rows = []
    for pair in pairs:
        a, sep, b = pair.partition("-")
        if not sep or a not in records or b not in records:
            raise app.UsageError(f"--pair={pair}: expected A-B with A and B among the --run "
                                 f"labels {sorted(records)}")
        common = sorted(set(records[a]) & set(records[b]))
        if not common:
            raise app.UsageError(f"--pair={pair}: no seed holds both")
        for key in keys:
            missing = [s for s in common if key not in records[a][s] or key not in records[b][s]]
            if missing:
                raise app.UsageError(f"--pair={pair}: {key} missing for seeds {missing}")
            values = [records[a][s][key] for s in common]
            baseline = [records[b][s][key] for s in common]
            rows.append({"pair": f"{a} - {b}", "key": key,
                         **runner.paired_difference(values, baseline),
                         "per_seed": {s: x - y for s, x, y in zip(common, values, baseline)}})
    return rows


def markdown(rows):
    lines = ["| comparison | quantity | mean difference [95% t interval] | per seed | seeds |",
             "|---|---|---:|---|---:|"]
    for row in rows:
        interval = ("" if row["ci95"] is None else
                    f" [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]")
        per_seed = ", ".join(f"{d:+.4f}" for d in row["per_seed"].values())
        lines.append(f"| {row['pair']} | {row['key']} | {row['mean_difference']:+.4f}{interval} "
                     f"| {per_seed} | {row['seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if not FLAGS.run or not FLAGS.pair:
        raise app.UsageError("give at least one --run and one --pair")
    runs = [parse_run(text) for text in FLAGS.run]
    rows = compare(runs, FLAGS.pair, FLAGS.keys, [int(s) for s in FLAGS.seeds])
    table = markdown(rows)
    print(table)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            f.write(table)
        with open(os.path.splitext(FLAGS.output)[0] + ".json", "w") as f:
            json.dump({"runs": [dict(zip(("label", "folder", "arm"), r)) for r in runs],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
