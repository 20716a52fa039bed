r"""What BatchNorm statistics over the real atoms cost a GIN, against statistics over every
padded slot.

    python -m benchmarks.gin_batch_statistics            # the graph experiment's CPU GIN
    python -m benchmarks.gin_batch_statistics --quick    # tiny sizes, a smoke run

`nets.GIN` takes its training-mode BatchNorm statistics over the real nodes of a padded batch
(Keras' masked moments: about twice the elementwise passes of the unmasked ones). This
measures the price on a real batch: the first --molecules of RDKit's shipped molecules packed
into one padded batch (the graph experiment's 256-slot buckets), a GIN of --layers x --hidden
(no dropout). Two arms, built from one seed: "real atoms" (the library) and "every slot"
(the same GIN with the mask withheld from BatchNorm's moments, the behaviour before). Timed:
one gradient and one reverse-over-reverse HVP of the sum of squared embeddings, each a
tf.function; median seconds over --repeats rounds of --calls calls, the two arms alternated
within each round so that both see the same machine load. Also reported: the largest
difference between the two arms' embeddings (they differ by construction, so this shows the
size of the change, not an error).

Writes benchmarks/results/gin_batch_statistics.{md,json} (or --output_dir).
"""

import contextlib
import json
import os
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_metapt.data import EDGE_VOCAB_SIZES, NODE_VOCAB_SIZES, batch_graphs  # noqa: E402
from keras_metapt.data import embedded, smiles_to_graph  # noqa: E402
from keras_metapt.nets import GIN  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("molecules", 64, "Molecules in the batch.")
flags.DEFINE_integer("layers", 3, "GIN layers.")
flags.DEFINE_integer("hidden", 64, "GIN width H.")
flags.DEFINE_integer("repeats", 7, "Rounds (the median is reported).")
flags.DEFINE_integer("calls", 20, "Calls per round and arm.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where gin_batch_statistics.md/.json go.")

ARMS = ("real atoms", "every slot")


class _EverySlotBatchNorm:
    """While active, Keras BatchNormalization ignores the mask in its moments (the arm
    "every slot"); a context manager around tracing, where the moments are built."""

    def __enter__(self):
        self.original = keras.layers.BatchNormalization._moments
        original = self.original
        keras.layers.BatchNormalization._moments = lambda layer, x, mask: original(layer, x, None)

    def __exit__(self, *exc):
        keras.layers.BatchNormalization._moments = self.original


def build(batch, every_slot):
    """(embed, gradient, hvp) tf.functions of one GIN arm, traced here."""
    gin = GIN(NODE_VOCAB_SIZES, EDGE_VOCAB_SIZES, num_graphs=FLAGS.molecules,
              num_layers=FLAGS.layers, hidden=FLAGS.hidden, dropout=0.0, seed=0)
    weights = gin.trainable_variables
    gin(batch, training=True)
    rng = np.random.default_rng(1)
    direction = [tf.constant(rng.normal(size=w.shape).astype("float32")) for w in weights]

    @tf.function
    def embed():
        return gin(batch, training=True)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(gin(batch, training=True) ** 2)
        return tape.gradient(loss, weights)

    @tf.function
    def hvp():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(gin(batch, training=True) ** 2)
            grads = inner.gradient(loss, weights)
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, direction)])
        return outer.gradient(dot, weights)

    with _EverySlotBatchNorm() if every_slot else contextlib.nullcontext():
        return [f.get_concrete_function() for f in (embed, gradient, hvp)]


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.molecules, FLAGS.layers, FLAGS.hidden = 8, 1, 8
        FLAGS.repeats, FLAGS.calls = 2, 2
    graphs = [smiles_to_graph(s) for s in embedded.pretraining_smiles(FLAGS.molecules)]
    batch = {k: tf.constant(v) for k, v in batch_graphs(
        graphs, node_buckets=tuple(range(256, 1 << 16, 256))).items()}
    slots, real = int(batch["node_mask"].shape[0]), int(np.sum(batch["node_mask"]))
    arms = {"real atoms": build(batch, False), "every slot": build(batch, True)}
    difference = float(np.max(np.abs(arms["real atoms"][0]().numpy()
                                     - arms["every slot"][0]().numpy())))
    times = {(arm, name): [] for arm in ARMS for name in ("gradient", "hvp")}
    for _ in range(FLAGS.repeats):
        for arm in ARMS:
            for name, function in zip(("gradient", "hvp"), arms[arm][1:]):
                function()  # warm
                start = time.perf_counter()
                for _ in range(FLAGS.calls):
                    function()
                times[(arm, name)].append((time.perf_counter() - start) / FLAGS.calls)
    median = {key: float(np.median(value)) for key, value in times.items()}
    lines = ["## GIN BatchNorm statistics: real atoms against every padded slot", "",
             f"`python -m benchmarks.gin_batch_statistics{' --quick' if FLAGS.quick else ''}`: "
             f"{FLAGS.molecules} molecules ({real} atoms in {slots} slots), GIN "
             f"{FLAGS.layers} x {FLAGS.hidden}, tf.function, median over {FLAGS.repeats} rounds "
             f"of {FLAGS.calls} calls, arms alternated.", "",
             "| call | real atoms (ms) | every slot (ms) | ratio |", "|---|---:|---:|---:|"]
    for name, label in (("gradient", "gradient"), ("hvp", "HVP (reverse over reverse)")):
        a, b = median[("real atoms", name)], median[("every slot", name)]
        lines.append(f"| {label} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f}x |")
    lines += ["", f"Largest difference between the two arms' embeddings: {difference:.3g}."]
    report = "\n".join(lines) + "\n"
    print(report)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "gin_batch_statistics.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "gin_batch_statistics.json"), "w") as f:
        json.dump({"molecules": FLAGS.molecules, "layers": FLAGS.layers, "hidden": FLAGS.hidden,
                   "slots": slots, "atoms": real, "repeats": FLAGS.repeats,
                   "calls": FLAGS.calls, "quick": FLAGS.quick,
                   "embedding_max_difference": difference,
                   "seconds": {f"{arm}/{name}": times[(arm, name)] for arm, name in times},
                   "median_seconds": {f"{arm}/{name}": v for (arm, name), v in median.items()}},
                  f, indent=1)


if __name__ == "__main__":
    app.run(main)
