r"""Cost of one MetaPretrainer hypergradient by HVP mode: reverse-over-reverse against
forward-over-reverse (mixed mode), with i = 1 and i = 5 Neumann terms.

    python -m benchmarks.hvp_modes            # reference configuration (about 2 minutes)
    python -m benchmarks.hvp_modes --quick    # tiny sizes, a smoke run

Configuration: that of benchmarks.meta_pt (MLP encoder 128-256-256-256, PT head -> 500 tasks
with TaskWeights, FT head -> 10, batch 64, K = 1, Adam, float32, random data, seed 0).
Flags: those of benchmarks.meta_pt (sizes, --repeats, --quick, --output_dir) and --terms.
Measured: `MetaPretrainer.hypergradient` on one fixed stream element as a compiled function
(tf.function, and XLA), median over --repeats calls, the modes alternated over 3 rounds; and
one plain gradient of the PT loss for scale. On a GPU it also reports the allocator's peak
memory per configuration (TensorFlow reports no allocator peak for the CPU).

Writes benchmarks/results/hvp_modes.{md,json} (or --output_dir).
"""

import json
import os

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from benchmarks import meta_pt  # noqa: E402  (its flags: the reference configuration)
from keras_metapt.hyper import TaskWeights  # noqa: E402
from keras_metapt.losses import masked_multitask_bce  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("terms", ["1", "5"], "Neumann terms i to measure.")

MODES = ("reverse_over_reverse", "forward_over_reverse")


def build(hvp_mode, terms):
    encoder, pt_head, ft_head = meta_pt.parts()
    model = km.MetaPretrainer(
        encoder, pt_head, ft_head, TaskWeights(FLAGS.pt_tasks),
        pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w), ft_loss=meta_pt.ft_loss,
        solve=km.linalg.neumann(terms), hvp_mode=hvp_mode, warmup_steps=0)
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3),
                  keras.optimizers.Adam(1e-3), jit_compile=False)
    return model


def element():
    rng = np.random.default_rng(0)
    b, d = FLAGS.batch, FLAGS.input_dim

    def draw(*shape):
        return tf.constant(rng.normal(size=shape).astype("float32"))

    def labels(*shape):
        return tf.constant((rng.random(shape) < 0.5).astype("float32"))

    return {"pt": (draw(b, d), labels(b, FLAGS.pt_tasks)),
            "pt_fresh": (draw(b, d), labels(b, FLAGS.pt_tasks)),
            "meta_train": (draw(b, 1, d), labels(b, 1, FLAGS.ft_tasks)),
            "meta_val": (draw(b, d), labels(b, FLAGS.ft_tasks))}


def gpu_peak_mib(fn):
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    tf.config.experimental.reset_memory_stats("GPU:0")
    fn()
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.hidden, FLAGS.pt_tasks, FLAGS.repeats, FLAGS.input_dim = ["16", "16"], 20, 3, 16
    data = element()
    rows = []
    for xla in (False, True):
        gradient_model = build(MODES[0], 1)
        pt_vars = gradient_model.pt_variables

        @tf.function(jit_compile=xla)
        def pt_gradient():
            with tf.GradientTape() as tape:
                x, y = data["pt_fresh"]
                preds = gradient_model.pt_head(gradient_model.encoder(x, training=True))
                loss = masked_multitask_bce(y, preds, gradient_model.meta_layer(x))
            return tape.gradient(loss, pt_vars)

        gradient_ms = meta_pt.function_ms(pt_gradient)
        functions = {(mode, int(terms)): tf.function(build(mode, int(terms)).hypergradient,
                                                     jit_compile=xla)
                     for terms in FLAGS.terms for mode in MODES}
        timings = {key: [] for key in functions}
        for _ in range(1 if FLAGS.quick else 3):  # rounds, alternating the configurations
            for key, fn in functions.items():
                timings[key].append(meta_pt.function_ms(lambda fn=fn: fn(data)))
        for (mode, terms), values in timings.items():
            ms = float(np.median(values))
            rows.append({"compilation": "XLA" if xla else "tf.function", "hvp_mode": mode,
                         "neumann_terms": terms, "hypergradient_ms": ms,
                         "pt_gradient_ms": gradient_ms, "ratio_to_gradient": ms / gradient_ms,
                         "gpu_peak_mib": gpu_peak_mib(lambda fn=functions[(mode, terms)]: fn(data))})
    device = "GPU" if tf.config.list_logical_devices("GPU") else f"{os.cpu_count()} CPU cores"
    lines = ["## HVP modes: reverse-over-reverse vs forward-over-reverse", "",
             f"`python -m benchmarks.hvp_modes{' --quick' if FLAGS.quick else ''}`: encoder "
             f"{FLAGS.input_dim}-{'-'.join(FLAGS.hidden)}, PT head ->{FLAGS.pt_tasks} tasks, "
             f"FT head ->{FLAGS.ft_tasks}, batch {FLAGS.batch}, K=1, float32; TensorFlow "
             f"{tf.__version__}, {device}.", "",
             "| compilation | HVP mode | i | hypergradient | PT gradient | hypergradient / gradient | GPU peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "n/a (CPU)" if r["gpu_peak_mib"] is None else f"{r['gpu_peak_mib']:.0f} MiB"
        lines.append(f"| {r['compilation']} | {r['hvp_mode']} | {r['neumann_terms']} | "
                     f"{r['hypergradient_ms']:.2f} ms | {r['pt_gradient_ms']:.2f} ms | "
                     f"{r['ratio_to_gradient']:.2f}x | {peak} |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "hvp_modes.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.output_dir, "hvp_modes.json"), "w") as f:
        json.dump({"rows": rows, "quick": FLAGS.quick}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
