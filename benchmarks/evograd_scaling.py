r"""EvoGrad against the second-order one-step hypergradient as the network grows: time per
Meta-Weight-Net step and peak memory, with a plain training step as the unit.

    python -m benchmarks.evograd_scaling            # MLP, CNN, ResNet-10/18/34 (~10 min, 2 cores)
    python -m benchmarks.evograd_scaling --quick    # tiny sizes, a smoke run

The step measured is the one apps/noisy_labels.py runs (`keras_metapt.reweighting.
MetaWeightNetTrainer.compiled_step`, batch --batch_size of 28x28x1 images for both the training
and the meta batch; SGD rate 0.05, Meta-Weight-Net 1-100-1 with Adam 1e-3):
- plain: one SGD step on the mean cross-entropy (the "uniform" arm);
- evograd: the EvoGrad hypergradient (K = --copies perturbed copies), an Adam step on the
  Meta-Weight-Net and the weighted SGD step ("mwn_evograd --mwn_input=evaluated": every copy
  weighs its own losses, as the EvoGrad code);
- evograd_current: the same with every copy weighed at the current weights' losses
  (--mwn_input=current: one more forward pass per step);
- evograd_copies_mean: the same with every copy weighed at the mean of the K copies' losses
  (--mwn_input=copies_mean: no extra forward pass);
- one_step: the same with the second-order one-step look-ahead hypergradient
  (keras_metapt.Unrolled, T = 1, "mwn_one_step"), as the original Meta-Weight-Net.
Each (network, method) runs in a fresh subprocess (TensorFlow pools freed CPU memory): the
step is traced, the kernel's peak-RSS counter is reset, and the memory figure is the peak
resident memory of its first execution minus the resident memory before it (on a GPU: the
allocator's peak). A third fresh process per (network, method) measures the tensors the step
holds at once on its second execution (`benchmarks.memory.peak_requested_mib`: bytes requested
from TensorFlow's BFC allocator, without its pooling, rounding and one-time graph optimisation;
what a GPU allocator's peak counts). The times come from one more process per network that
holds every method's step and the MWN methods' hyperstep alone (`MetaWeightNetTrainer.
hyperstep`) and runs --repeats rounds of one call each, interleaved (median per call).
tf.function, no XLA, one inter-op thread (as the apps on one device).

Writes benchmarks/results/evograd_scaling.{md,json,png} (or --output_dir).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apps import runner  # noqa: E402
from benchmarks.memory import first_execution_peak_mib, peak_requested_mib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("nets", ["mlp", "cnn", "resnet10", "resnet18", "resnet34"], "Networks of "
                  "apps/noisy_labels.py (its --network values).")
flags.DEFINE_integer("width", 16, "--width of the networks.")
flags.DEFINE_integer("batch_size", 100, "Training and meta batch size.")
flags.DEFINE_integer("copies", 2, "EvoGrad's K.")
flags.DEFINE_enum("noise", "rademacher", ["rademacher", "gaussian"], "EvoGrad's noise, as "
                  "apps/noisy_labels.py's --evograd_noise (rademacher there too; it draws 32 "
                  "signs per random word: see benchmarks/evograd_cost.py).")
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds after a first step "
                     "(median per method).")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where evograd_scaling.md, .json and .png are written.")
flags.DEFINE_bool("plot_only", False, "Redraw evograd_scaling.png from the "
                  "evograd_scaling.json in --output_dir (no measurement).")
flags.DEFINE_string("child", None, "Internal: measure '<net>:<method>' and print its JSON.")

# the app's arms uniform, mwn_evograd (--mwn_input=evaluated / current, its default /
# copies_mean), mwn_one_step
METHODS = ("plain", "evograd", "evograd_current", "evograd_copies_mean", "one_step")
LABELS = {"plain": "plain SGD", "evograd": "EvoGrad, own losses (EvoGrad code)",
          "evograd_current": "EvoGrad, current losses",
          "evograd_copies_mean": "EvoGrad, copies' mean losses",
          "one_step": "one-step (second order)"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_size():
    return 8 if FLAGS.quick else FLAGS.batch_size


def trainer_and_batches(net, method):
    """The trainer for (net, method), as apps/noisy_labels.py builds it, and one training and
    one meta batch (seeded)."""
    import keras
    import keras_metapt as km
    from keras_metapt import nets, optim
    keras.utils.set_random_seed(0)
    width, batch = (2 if FLAGS.quick else FLAGS.width), batch_size()
    lr = 0.05
    extra = {}
    if method != "plain":
        estimator = (km.EvoGrad(num_copies=FLAGS.copies, sigma=1e-3, temperature=0.05,
                               noise=FLAGS.noise)
                     if method.startswith("evograd") else km.Unrolled(optim.sgd(lr), num_steps=1))
        extra = dict(mwn=km.hyper.MetaWeightNet(100, seed=0),
                     meta_optimizer=keras.optimizers.Adam(1e-3), estimator=estimator,
                     mwn_input={"evograd_current": "current",
                                "evograd_copies_mean": "copies_mean"}.get(method, "evaluated"))
    trainer = km.reweighting.MetaWeightNetTrainer(nets.image_classifier(net, width),
                                                  learning_rate=lr, **extra)
    rng = np.random.default_rng(0)

    def images():
        return (tf.constant(rng.random((batch, 28, 28, 1), np.float32)),
                tf.constant(rng.integers(0, 10, batch).astype(np.int32)))
    return trainer, images(), images()


def child(net, method, held=False):
    """Peak memory of one method's first step (a fresh process per method); ``held``: the
    peak of the tensors its second step holds at once (BFC allocator on CPU)."""
    trainer, train, meta = trainer_and_batches(net, method)
    concrete = trainer.compiled_step.get_concrete_function(train, meta)  # traced, not run
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if held and not gpu:
        concrete(train, meta)[0].numpy()
        peak, _, _ = peak_requested_mib(lambda: concrete(train, meta)[0].numpy())
    elif gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
        concrete(train, meta)[0].numpy()
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
    else:
        peak, _, _ = first_execution_peak_mib(lambda: concrete(train, meta)[0].numpy())
    params = sum(int(np.prod(v.shape)) for v in trainer.model.trainable_variables)  # trainable
    return {"net": net, "method": method, "peak_mib": float(peak), "params": params}


def timing_child(net):
    """Median ms per step of every method, and of the MWN methods' hyperstep alone, measured
    interleaved in one process: each of --repeats rounds runs one call of each in turn
    (after a first, untimed call)."""
    steps = {}
    for method in METHODS:
        trainer, train, meta = trainer_and_batches(net, method)
        steps[method] = (trainer.compiled_step.get_concrete_function(train, meta), train, meta)
        if method != "plain":  # the MWN update alone, without the weighted SGD step
            steps[f"{method}_hyperstep"] = (tf.function(trainer.hyperstep).get_concrete_function(
                train, meta), train, meta)
    for concrete, train, meta in steps.values():
        concrete(train, meta)[0].numpy()
    times = {method: [] for method in steps}
    for _ in range(FLAGS.repeats):
        for method, (concrete, train, meta) in steps.items():
            start = time.perf_counter()
            concrete(train, meta)[0].numpy()
            times[method].append(time.perf_counter() - start)
    return {"net": net, "ms": {m: 1e3 * float(np.median(t)) for m, t in times.items()}}


def run_child(spec, env=None):
    cmd = [sys.executable, "-m", "benchmarks.evograd_scaling", f"--child={spec}",
           f"--repeats={FLAGS.repeats}", f"--width={FLAGS.width}",
           f"--batch_size={FLAGS.batch_size}", f"--copies={FLAGS.copies}",
           f"--noise={FLAGS.noise}"]
    cmd += ["--quick"] if FLAGS.quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure():
    rows = []
    for net in FLAGS.nets:
        row = {"net": net, "peak_mib": {}, "held_mib": {}, "ms": {}}
        for method in METHODS:
            result = run_child(f"{net}:{method}")
            row["peak_mib"][method], row["params"] = result["peak_mib"], result["params"]
            row["held_mib"][method] = run_child(f"{net}:{method}:held",
                                                {"TF_CPU_ALLOCATOR_USE_BFC": "true"})["peak_mib"]
        row["ms"] = run_child(f"{net}:timing")["ms"]
        rows.append(row)
        hypersteps = ", ".join(f"{row['ms'][m + '_hyperstep']:.1f}" for m in METHODS[1:])
        held = ", ".join(f"{row['held_mib'][m]:.0f}" for m in METHODS)
        print(f"  {net} ({row['params']:,} weights): "
              + ", ".join(f"{m} {row['ms'][m]:.1f} ms / +{row['peak_mib'][m]:.0f} MiB"
                          for m in METHODS)
              + f" (hypersteps: {hypersteps} ms; held: {held} MiB)", flush=True)
    return rows


def report(rows):
    device = "GPU" if tf.config.list_physical_devices("GPU") else f"{os.cpu_count()} CPU cores"
    lines = ["## EvoGrad against second-order one-step: Meta-Weight-Net step cost", "",
             f"`python -m benchmarks.evograd_scaling{' --quick' if FLAGS.quick else ''}"
             f"{'' if FLAGS.noise == 'rademacher' else ' --noise=' + FLAGS.noise}"
             f"{'' if FLAGS.repeats == 5 else f' --repeats={FLAGS.repeats}'}`; "
             f"TensorFlow {tf.__version__}, {device}; batch {batch_size()}, EvoGrad "
             f"K={FLAGS.copies} ({FLAGS.noise} noise). Time per step (ms, median of "
             f"{FLAGS.repeats} interleaved rounds of one call per method, after a first call, "
             "in one process): the whole training step (the MWN update, then the weighted "
             "SGD step), and the hyperstep alone (the MWN update). Peak memory (MiB) of the first execution, a fresh process per "
             "method ("
             + ("the allocator's peak" if device == "GPU" else
                "MiB above the resident memory before it; it includes TensorFlow's one-time "
                "graph optimisation, larger for a larger graph") + "); held: the peak of the "
             "tensors the second execution holds at once (bytes requested from the BFC "
             "allocator, a fresh process per method).", "",
             "| network | weights | method | step ms | / plain | / one-step | hyperstep ms | "
             "hyperstep / plain step | / one-step hyperstep | RSS MiB | / one-step | "
             "held MiB | / one-step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms, mib, held = r["ms"], r["peak_mib"], r["held_mib"]
        for method in METHODS:
            hyper = f"{method}_hyperstep"
            hyper_cells = ("- | - | -" if hyper not in ms else
                           f"{ms[hyper]:.1f} | {ms[hyper] / ms['plain']:.2f}x | "
                           f"{ms[hyper] / ms['one_step_hyperstep']:.2f}x")
            lines.append(
                f"| {r['net']} | {r['params']:,} | {LABELS[method]} | {ms[method]:.1f} | "
                f"{ms[method] / ms['plain']:.2f}x | {ms[method] / ms['one_step']:.2f}x | "
                f"{hyper_cells} | {mib[method]:.0f} | {mib[method] / mib['one_step']:.2f}x | "
                f"{held[method]:.0f} | {held[method] / held['one_step']:.2f}x |")
    lines += ["", "Targets at the largest network: EvoGrad memory <= 0.6x and time <= 0.7x of "
              "one-step; EvoGrad <= 2x a plain step (K=2). RSS: first-execution peak; held: "
              "tensors held at once."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Time (whole step solid, hyperstep alone dashed) and memory (first-execution RSS solid,
    tensors held dashed) against the weight count: the convolutional family as lines, any
    other network (the MLP) as separate markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    family = sorted((r for r in rows if r["net"] != "mlp"), key=lambda r: r["params"])
    others = [r for r in rows if r["net"] == "mlp"]
    series = {left: [("ms", "", "o-"), ("ms", "_hyperstep", "s--")],
              right: [("peak_mib", "", "o-"), ("held_mib", "", "s--")]}
    for ax, kinds in series.items():
        for method in METHODS:
            color = None
            for key, suffix, style in kinds:
                name = method + suffix
                if name not in rows[0][key]:
                    continue
                label = {("ms", ""): method, ("ms", "_hyperstep"): f"{method}, hyperstep alone",
                         ("peak_mib", ""): method, ("held_mib", ""): f"{method}, tensors held"}
                line, = ax.plot([r["params"] for r in family], [r[key][name] for r in family],
                                style, color=color, label=label[(key, suffix)])
                color = line.get_color()
                ax.plot([r["params"] for r in others], [r[key][name] for r in others],
                        style[0], color=color, fillstyle="none")
        for r in family + others:
            ax.annotate(r["net"], (r["params"], r["ms" if ax is left else "peak_mib"]["one_step"]),
                        fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    left.set(xscale="log", yscale="log", xlabel="network weights", ylabel="ms per call",
             title="time per Meta-Weight-Net step (open: MLP)")
    right.set(xscale="log", xlabel="network weights", ylabel="peak memory (MiB)",
              title="first-execution peak RSS; tensors held")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    if FLAGS.child:
        # as the apps run on one device (apps/runner.py): independent ops one after another.
        tf.config.threading.set_inter_op_parallelism_threads(1)
        net, method, *held = FLAGS.child.split(":")
        print(json.dumps(timing_child(net) if method == "timing"
                         else child(net, method, held == ["held"])))
        return
    if FLAGS.plot_only:
        rows = json.load(open(os.path.join(FLAGS.output_dir, "evograd_scaling.json")))["rows"]
        plot(rows, os.path.join(FLAGS.output_dir, "evograd_scaling.png"))
        return
    rows = measure()
    text = report(rows)
    print("\n" + text)
    runner.write_report(FLAGS.output_dir, "evograd_scaling", text, {
        "rows": rows, "quick": FLAGS.quick, "batch_size": batch_size(), "noise": FLAGS.noise,
        "width": 2 if FLAGS.quick else FLAGS.width, "copies": FLAGS.copies})
    plot(rows, os.path.join(FLAGS.output_dir, "evograd_scaling.png"))


if __name__ == "__main__":
    app.run(main)
