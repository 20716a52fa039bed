r"""What one EvoGrad hypergradient costs against its floor, K forward passes + 1 gradient.

    python -m benchmarks.evograd_cost            # two MLPs, graph and XLA (~2 min, 2 cores)
    python -m benchmarks.evograd_cost --quick    # tiny sizes, a smoke run

Problem: benchmarks/hypergrad.py's reference problem (MLP, ReLU, softmax cross-entropy,
batch --batch of fixed random data, hyperparameters = per-example loss weights
sigmoid(logit)) for each --mlps entry (input-hidden...-10). Rows, all in one tf.function
(with and without jit_compile), timed interleaved: every round runs each row once, and the
figure is the median over --rounds rounds of each row's --calls calls:
- forward: one inner loss;
- gradient: one inner gradient (the unit);
- floor: what EvoGrad cannot avoid: K inner losses at K fixed parameter sets, their softmax
  combination, one outer gradient and the backward pass through the K losses to phi;
- noise gaussian / rademacher: the K perturbations of every parameter alone
  (`keras_metapt.hypergrad.evograd.perturbations`, one Philox call per leaf);
- EvoGrad gaussian / rademacher: `keras_metapt.EvoGrad` (K = --copies, sigma 1e-3, tau 0.05);
- EvoGrad ..., per-copy draws: the same estimator drawing each (copy, leaf) with its own
  Philox call and, for Rademacher, one random integer per sign (the scheme before one draw
  per leaf and 32 signs per drawn word).

Writes benchmarks/results/evograd_cost.{md,json,png} (or --output_dir).
"""

import json
import os
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_metapt import _tree  # noqa: E402
from keras_metapt.hypergrad import evograd  # noqa: E402
from benchmarks.reference_mlp import reference_problem  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("mlps", ["64-256-256-10", "784-768-100-10"], "MLP sizes input-hidden...-10: "
                  "the reference problem of benchmarks/hypergrad.py and one with as many "
                  "weights as apps/noisy_labels.py's MLP.")
flags.DEFINE_integer("batch", 256, "Inner and outer batch size.")
flags.DEFINE_integer("copies", 2, "EvoGrad's K.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds (median over rounds).")
flags.DEFINE_integer("calls", 10, "Calls per row per round (their mean is one sample).")
flags.DEFINE_bool("quick", False, "Tiny sizes, few calls: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where evograd_cost.md, .json and .png are written.")

SIGMA, TAU = 1e-3, 0.05


class PerCopyDraws(km.EvoGrad):
    """EvoGrad with one Philox call per (copy, leaf) and one random integer per Rademacher
    sign: the comparison row."""

    def _perturbations(self, leaf, seed):
        out = []
        for k, copy_seed in enumerate(tf.unstack(
                tf.random.experimental.stateless_split(seed, self.num_copies))):
            if self.noise == "gaussian":
                eps = tf.random.stateless_normal(tf.shape(leaf), copy_seed, alg="philox")
            else:
                eps = tf.cast(2 * tf.random.stateless_uniform(
                    tf.shape(leaf), copy_seed, 0, 2, tf.int32, alg="philox") - 1, tf.float32)
            out.append(_tree.cast_scalar(self.sigma, leaf.dtype) * tf.cast(eps, leaf.dtype))
        return tf.stack(out)


def sizes():
    mlps = ["16-32-10"] if FLAGS.quick else FLAGS.mlps
    return [[int(v) for v in m.split("-")] for m in mlps]


def rows_for(layers):
    """{row name: (function, args)} for one MLP."""
    if layers[-1] != 10:
        raise app.UsageError(f"--mlps: {'-'.join(map(str, layers))} must end in 10 classes")
    batch = 16 if FLAGS.quick else FLAGS.batch
    problem, _, params, logits, _, inner, outer = reference_problem(
        layers[1:-1], batch, 1, inputs=layers[0])
    inner, outer = tf.nest.map_structure(tf.constant, (inner, outer))
    K = FLAGS.copies
    seed = tf.constant([3, 4], tf.int64)
    fixed = [[p + SIGMA * (k + 1) for p in params] for k in range(K)]

    def forward(p, h, b):
        return problem.inner_loss(p, h, b)

    def gradient(p, h, b):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = problem.inner_loss(p, h, b)
        return tape.gradient(loss, p)

    def floor(copies, h, b_in, b_out):
        with tf.GradientTape() as tape:
            tape.watch(h)
            losses = tf.stack([problem.inner_loss(c, h, b_in) for c in copies])
            w = tf.nn.softmax(-losses / TAU)
            combined = [tf.add_n([w[k] * c[i] for k, c in enumerate(copies)])
                        for i in range(len(copies[0]))]
            with tf.GradientTape() as outer_tape:
                outer_tape.watch(combined)
                outer_loss = problem.outer_loss(combined, h, b_out)
            g = outer_tape.gradient(outer_loss, combined)
            surrogate = tf.add_n([tf.reduce_sum(tf.stop_gradient(a) * b)
                                  for a, b in zip(g, combined)])
        return tape.gradient(surrogate, h)

    def noise(kind):
        def draw(p, s):
            seeds = tf.random.experimental.stateless_split(s, len(p))
            return [evograd.perturbations(x, seeds[i], K, SIGMA, kind) for i, x in enumerate(p)]
        return draw

    rows = {"forward": (forward, (params, logits, inner)),
            "gradient (unit)": (gradient, (params, logits, inner)),
            f"floor: {K} forwards + 1 gradient": (floor, (fixed, logits, inner, outer))}
    for kind in ("gaussian", "rademacher"):
        rows[f"noise {kind}"] = (noise(kind), (params, seed))
    for kind in ("gaussian", "rademacher"):
        for label, cls in (("", km.EvoGrad), (", per-copy draws", PerCopyDraws)):
            est = cls(num_copies=K, sigma=SIGMA, temperature=TAU, noise=kind)
            rows[f"EvoGrad {kind}{label}"] = (
                lambda p, h, b_in, b_out, s, est=est: est(problem, p, h, b_in, b_out,
                                                          seed=s).hypergrad,
                (params, logits, inner, outer, seed))
    return rows, sum(int(np.prod(p.shape)) for p in params)


def time_rows(rows, xla):
    """{name: median ms} over interleaved rounds."""
    compiled = {name: (tf.function(fn, jit_compile=xla), args) for name, (fn, args) in rows.items()}
    for fn, args in compiled.values():  # trace and compile
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    samples = {name: [] for name in rows}
    rounds, calls = (2, 2) if FLAGS.quick else (FLAGS.rounds, FLAGS.calls)
    for _ in range(rounds):
        for name, (fn, args) in compiled.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            tf.nest.map_structure(lambda t: t.numpy(), out)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: 1e3 * float(np.median(s)) for name, s in samples.items()}


def markdown(results, elapsed):
    lines = ["# EvoGrad: cost of one hypergradient against its floor", "",
             f"`python -m benchmarks.evograd_cost{' --quick' * FLAGS.quick}`; K = {FLAGS.copies}, "
             f"sigma {SIGMA}, tau {TAU}, batch {16 if FLAGS.quick else FLAGS.batch}; median over "
             "interleaved rounds; tf.function (graph) and XLA; "
             f"{os.cpu_count()} CPU cores; {elapsed:.0f} s.", ""]
    for entry in results:
        floor_name = next(n for n in entry["graph"] if n.startswith("floor"))
        lines += [f"## MLP {entry['mlp']} ({entry['weights']:,} weights)", "",
                  "| row | ms graph | x floor | ms XLA | x floor |", "|---|---:|---:|---:|---:|"]
        for name in entry["graph"]:
            cells = []
            for mode in ("graph", "xla"):
                ms = entry[mode][name]
                cells += [f"{ms:.2f}", f"{ms / entry[mode][floor_name]:.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, entry in zip(axes[0], results):
        names = list(entry["graph"])
        y = np.arange(len(names))
        ax.barh(y - 0.2, [entry["graph"][n] for n in names], 0.4, label="graph")
        ax.barh(y + 0.2, [entry["xla"][n] for n in names], 0.4, label="XLA")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="ms per call", title=f"MLP {entry['mlp']} ({entry['weights']:,} weights)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    start = time.perf_counter()
    results = []
    for layers in sizes():
        rows, weights = rows_for(layers)
        entry = {"mlp": "-".join(map(str, layers)), "weights": weights}
        for mode, xla in (("graph", False), ("xla", True)):
            entry[mode] = time_rows(rows, xla)
            print(f"  MLP {entry['mlp']} {mode}: " + ", ".join(
                f"{n} {ms:.2f} ms" for n, ms in entry[mode].items()), flush=True)
        results.append(entry)
    text = markdown(results, time.perf_counter() - start)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "evograd_cost.md"), "w") as f:
        f.write(text)
    with open(os.path.join(FLAGS.output_dir, "evograd_cost.json"), "w") as f:
        json.dump({"copies": FLAGS.copies, "sigma": SIGMA, "tau": TAU, "quick": FLAGS.quick,
                   "results": results}, f, indent=1)
    plot(results, os.path.join(FLAGS.output_dir, "evograd_cost.png"))
    print(text)


if __name__ == "__main__":
    app.run(main)
