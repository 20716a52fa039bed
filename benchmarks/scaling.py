r"""Data-parallel meta-PT: 1 replica against 2 (MirroredStrategy over 2 logical CPU devices).

    python -m benchmarks.scaling            # reference configuration (~2 minutes on 2 cores)
    python -m benchmarks.scaling --quick    # tiny sizes, a smoke run

The process splits its CPU into 2 logical devices. Both runs use the same global batches:
"1 replica" is the default strategy (one device), "2 replicas" is MirroredStrategy over both
devices, each replica computing on half of every global batch, with gradients, HVPs and the
hypergradient summed across replicas. Configuration: MLP encoder 128-256-256-256, PT head
->500 tasks (TaskWeights), FT head ->10 tasks, global batch 256 for every stream, K=1, i=1,
Adam, float32, no XLA; inputs N(0, 1), PT task t = 1[x . v_t > 0] for random v_t, FT tasks =
the first 10 PT tasks.

Measured per replica count, as ms per step of MetaPretrainer.fit (after a compile epoch;
--rounds epochs alternate between the two set-ups, medians reported):
  * regular steps only (PT step + FT-head step; warm-up covers the epoch),
  * hypersteps only (a hyperstep every step),
  * the mixed schedule (a hyperstep every N=10 steps);
and the largest |phi_2 - phi_1| after the same mixed-schedule epochs (correctness).
On 2 shared CPU cores the two "devices" share the same cores, so no speed-up is expected;
the ratios show the overhead of the cross-replica reductions. Writes
benchmarks/results/scaling.{md,json} (or --output_dir).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_dim", 128, "Input features.")
flags.DEFINE_list("hidden", ["256", "256", "256"], "Encoder widths.")
flags.DEFINE_integer("pt_tasks", 500, "PT tasks.")
flags.DEFINE_integer("ft_tasks", 10, "FT tasks.")
flags.DEFINE_integer("global_batch", 256, "Global batch size of every stream.")
flags.DEFINE_integer("hyperstep_every", 10, "N of the mixed schedule.")
flags.DEFINE_integer("steps", 40, "Steps per timed epoch.")
flags.DEFINE_integer("rounds", 3, "Timed epochs per set-up (median).")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run, not a measurement.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where scaling.md and scaling.json are written.")

SCHEDULES = {"regular": None, "hyper": 1, "mixed": "N"}


def main(argv):
    del argv
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import keras_metapt as km
    from keras_metapt.callbacks import EpochTimer
    from keras_metapt.hyper import TaskWeights
    from keras_metapt.losses import masked_multitask_bce

    logging.set_verbosity(logging.ERROR)
    if FLAGS.quick:
        FLAGS.input_dim, FLAGS.hidden, FLAGS.pt_tasks, FLAGS.ft_tasks = 16, ["32", "32"], 20, 3
        FLAGS.global_batch, FLAGS.steps, FLAGS.rounds = 32, 6, 1
    rng = np.random.default_rng(0)
    n = 8 * FLAGS.global_batch
    x = rng.normal(size=(n, FLAGS.input_dim)).astype("float32")
    # Linear-threshold tasks; the FT tasks are the first PT tasks, so hypergradients carry
    # signal (with random labels they are pure cancellation noise, and so is any comparison).
    directions = rng.normal(size=(FLAGS.input_dim, FLAGS.pt_tasks))
    y_pt = (x @ directions > 0).astype("float32")
    y_ft = y_pt[:, :FLAGS.ft_tasks].copy()

    def ft_loss(y, p):
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=p))

    def batched(*arrays):
        return tf.data.Dataset.from_tensor_slices(arrays).batch(FLAGS.global_batch,
                                                                drop_remainder=True)

    def build(strategy, schedule):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            hidden = [int(h) for h in FLAGS.hidden]
            encoder = keras.Sequential([keras.Input((FLAGS.input_dim,))] + [
                keras.layers.Dense(h, activation="relu") for h in hidden])
            pt_head = keras.Sequential([keras.Input((hidden[-1],)), keras.layers.Dense(FLAGS.pt_tasks)])
            ft_head = keras.Sequential([keras.Input((hidden[-1],)), keras.layers.Dense(FLAGS.ft_tasks)])
            every = {None: 1, 1: 1, "N": FLAGS.hyperstep_every}[schedule]
            warmup = 10 ** 9 if schedule is None else 0
            model = km.MetaPretrainer(encoder, pt_head, ft_head, TaskWeights(FLAGS.pt_tasks),
                                      pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w),
                                      ft_loss=ft_loss, hyperstep_every=every, warmup_steps=warmup)
            model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3),
                          keras.optimizers.Adam(1e-2), jit_compile=False)
        stream = km.meta_dataset(batched(x, y_pt), batched(x[:n // 2], y_ft[:n // 2]),
                                 batched(x[n // 2:], y_ft[n // 2:]))
        return model, stream

    strategies = {1: tf.distribute.get_strategy(),
                  2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    rows, phis = [], {}
    for name, schedule in SCHEDULES.items():
        runs = {}
        for replicas, strategy in strategies.items():
            model, stream = build(strategy, schedule)
            timer = EpochTimer()
            model.fit(stream, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0, callbacks=[timer])
            runs[replicas] = (model, stream, timer)
        times = {1: [], 2: []}
        for _ in range(FLAGS.rounds):  # alternate, so drift hits both alike
            for replicas, (model, stream, timer) in runs.items():
                model.fit(stream, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0,
                          callbacks=[timer])
                times[replicas].append(1e3 * timer.seconds[-1] / FLAGS.steps)
        ms = {r: float(np.median(t)) for r, t in times.items()}
        if schedule == "N":
            phis = {r: runs[r][0].meta_parameters()[0] for r in runs}
            encoders = {r: runs[r][0].encoder.get_weights() for r in runs}
        rows.append({"schedule": name, "ms_per_step_1": ms[1], "ms_per_step_2": ms[2],
                     "examples_per_second_1": FLAGS.global_batch * 1e3 / ms[1],
                     "examples_per_second_2": FLAGS.global_batch * 1e3 / ms[2],
                     "time_ratio_2_over_1": ms[2] / ms[1], "ms_1": times[1], "ms_2": times[2]})
        print(f"  {name}: 1 replica {ms[1]:.1f} ms/step, 2 replicas {ms[2]:.1f} ms/step", flush=True)
    phi_diff = float(np.abs(phis[1] - phis[2]).max())
    phi_moved = float(np.abs(phis[1]).max())
    encoder_diff = float(max(np.abs(a - b).max() for a, b in zip(encoders[1], encoders[2])))
    config = (f"encoder {FLAGS.input_dim}-{'-'.join(FLAGS.hidden)}, PT ->{FLAGS.pt_tasks} tasks, "
              f"FT ->{FLAGS.ft_tasks}, global batch {FLAGS.global_batch}, K=1, i=1, Adam, "
              "float32, no XLA")
    labels = {"regular": "regular steps only", "hyper": "hypersteps only",
              "mixed": f"mixed (hyperstep every {FLAGS.hyperstep_every})"}
    lines = ["## Data-parallel meta-PT: 1 vs 2 replicas", "",
             f"`python -m benchmarks.scaling{' --quick' if FLAGS.quick else ''}`: {config}; "
             f"2 logical devices on {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}.", "",
             "| steps | 1 replica (ms/step) | 2 replicas (ms/step) | 1 replica (ex/s) "
             "| 2 replicas (ex/s) | time 2 / 1 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {labels[r['schedule']]} | {r['ms_per_step_1']:.1f} | {r['ms_per_step_2']:.1f} "
                     f"| {r['examples_per_second_1']:.0f} | {r['examples_per_second_2']:.0f} "
                     f"| {r['time_ratio_2_over_1']:.2f}x |")
    lines += ["", f"Correctness: after {FLAGS.rounds + 1} mixed-schedule epochs, "
              f"max |phi(2 replicas) - phi(1 replica)| = {phi_diff:.2e} (phi moved up to "
              f"{phi_moved:.2e} from 0); max |encoder weight difference| = {encoder_diff:.2e}."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "scaling.md"), "w") as f:
        f.write(report)
    with open(os.path.join(FLAGS.output_dir, "scaling.json"), "w") as f:
        json.dump({"config": config, "rows": rows, "phi_max_abs_diff": phi_diff,
                   "encoder_max_abs_diff": encoder_diff,
                   "phi_max_abs": phi_moved, "quick": FLAGS.quick}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
