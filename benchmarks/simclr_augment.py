r"""Experiment 2 as a benchmark on Fashion-MNIST: (a) no PT, (b) SimCLR with the fixed
augmentations, (c) SimCLR with the meta-learned spatial warp.

    python -m benchmarks.simclr_augment            # CPU-sized subset, 3 seeds (~15 min, 2 cores)
    python -m benchmarks.simclr_augment --quick    # a smoke run on IDX files written by the test

CPU-sized subset (the defaults, passed to apps/simclr_augment.py): PT on 6,000 training images
(a seeded subset; labels unused), 5 PT epochs, batch 128 (256 views); labelled FT data: 0.5% of
the 60,000 training images (300: 150 MetaTrain + 150 MetaVal; linear evaluation and full FT use
all 300), 30 FT epochs; test: the first 2,000 test images. Small CNN encoder (94K weights),
projection 128->256->128, NT-Xent temperature 0.5, hyperstep every 10 PT steps (K=1, i=1).
The cost of meta-PT over plain SimCLR is the ratio of their PT examples/s (epochs that compile
nothing). Resumable: finished runs are kept under benchmarks/results/simclr_augment/.
Writes benchmarks/results/simclr_augment.{md,json}.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from apps import runner

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (>= 3 for a mean +- std worth reading).")
flags.DEFINE_string("images_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_integer("num_pt", 6000, "PT images.")
flags.DEFINE_float("label_fraction", 0.005, "Labelled fraction of the 60,000 training images.")
flags.DEFINE_integer("pt_epochs", 5, "PT epochs.")
flags.DEFINE_integer("ft_epochs", 30, "Linear-evaluation and fine-tuning epochs.")
flags.DEFINE_integer("num_test", 2000, "Test images.")
flags.DEFINE_bool("quick", False, "Tiny sizes on --images_dir: a smoke run, not a measurement.")
flags.DEFINE_list("app_flags", [], "Extra flags for apps/simclr_augment.py.")
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
        sizes = ["--num_pt=0", "--label_fraction=0.2", "--pt_epochs=3", "--ft_epochs=1",
                 "--num_test=0", "--batch_size=32", "--ft_batch_size=8", "--hyperstep_every=2"]
    cmd = [sys.executable, os.path.join(ROOT, "apps", "simclr_augment.py"), "--modality=image",
           f"--images_dir={FLAGS.images_dir}", f"--output_dir={run_dir}",
           f"--saved_models_dir={os.path.join(run_dir, 'saved_models')}", "--verbose=0",
           f"--seeds={','.join(FLAGS.seeds)}", *sizes, *FLAGS.app_flags]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    records = list(runner.load_results(os.path.join(run_dir, "results"), summary,
                                       FLAGS.seeds).values())
    meta_eps = summary["meta"]["pt_examples_per_second"]
    simclr_eps = summary["simclr"]["pt_examples_per_second"]
    cost = simclr_eps / meta_eps
    names = {"no_pt": "(a) no PT", "simclr": "(b) SimCLR, fixed augmentations",
             "meta": "(c) SimCLR + meta-learned warp"}
    lines = ["## SimCLR with a meta-learned augmentation (Fashion-MNIST)", "",
             f"`python -m benchmarks.simclr_augment{' --quick' if FLAGS.quick else ''}`: "
             + " ".join(sizes) + f"; seeds {', '.join(FLAGS.seeds)}; test AUROC is the macro "
             "average over the 10 classes (one-vs-rest), mean +- std over seeds.", "",
             (runner.summary_table(summary, MODES, names, seeds_column=False)
              + runner.paired_table(summary, MODES, names)).rstrip("\n")]
    scales = [r["warp_scale"] for r in records if r["arm"] == "meta"]
    lines += ["", f"Cost of meta-PT over plain SimCLR: {cost:.2f}x the time per PT example. "
              f"Learned warp scale after PT: {', '.join(f'{s:.4f}' for s in scales)} "
              "(initial 0.05).", "",
              "Target: (c) >= (b) > (a)."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "simclr_augment.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "simclr_augment.json"), "w") as f:
        json.dump({"summary": summary, "runs": records, "meta_cost_ratio": cost,
                   "sizes": sizes, "quick": FLAGS.quick}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
