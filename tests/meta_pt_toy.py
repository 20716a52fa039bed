"""A small MetaPretrainer run used by the tests (in process and as a killable subprocess).

    python -m tests.meta_pt_toy OUT_DIR EPOCHS [--sleep S]

writes OUT_DIR/phi.npy at the end; checkpoints every epoch in OUT_DIR/ckpt (MetaCheckpoint),
so running it again resumes.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metapt as km  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_metapt.callbacks import MetaCheckpoint  # noqa: E402
from keras_metapt.hyper import TaskWeights  # noqa: E402
from keras_metapt.losses import masked_multitask_bce  # noqa: E402


def synthetic_tasks(seed, n_help=10, n_orth=10, n_noise=10, d=20, k=3, n=4096, n_ft=256, flip=0.1):
    """PT tasks with known usefulness for an FT task y = 1[u.x > 0], u in a k-dim subspace S.

    helpful: 1[v_t.x > 0] with v_t = u + small perturbation in S, labels flipped w.p. ``flip``;
    distractors: directions in the complement of S (compete for encoder capacity);
    noise: random labels. Returns (x, y_pt, x_ft, y_ft, is_helpful).
    """
    rng = np.random.default_rng(seed)

    def directions(count, coords):
        v = np.zeros((count, d))
        v[:, coords] = rng.normal(size=(count, len(coords)))
        return v

    u = directions(1, range(k))[0]
    helpful = u + 0.1 * np.linalg.norm(u) / np.sqrt(k) * directions(n_help, range(k))
    v = np.concatenate([helpful, directions(n_orth, range(k, d)), np.zeros((n_noise, d))])
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ v.T > 0).astype("float32")
    y[:, n_help + n_orth:] = rng.random((n, n_noise)) < 0.5
    flips = rng.random((n, n_help)) < flip
    y[:, :n_help] = np.where(flips, 1 - y[:, :n_help], y[:, :n_help])
    x_ft = rng.normal(size=(n_ft, d)).astype("float32")
    y_ft = (x_ft @ u > 0).astype("float32")[:, None]
    is_helpful = np.r_[np.ones(n_help), np.zeros(n_orth + n_noise)]
    return x, y, x_ft, y_ft, is_helpful


def build(seed, num_tasks, d=20, bottleneck=4, hyperstep_every=1, jit_compile=False,
          hyper_lr=0.01, warmup_steps=50, steps_per_execution=1, solve=None, policy="float32",
          **kwargs):
    """The toy MetaPretrainer; ``policy``: the Keras dtype policy its parts are built under
    (the global policy is float32 again afterwards); ``kwargs`` go to MetaPretrainer."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _build(seed, num_tasks, d, bottleneck, hyperstep_every, jit_compile, hyper_lr,
                      warmup_steps, steps_per_execution, solve, **kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _build(seed, num_tasks, d, bottleneck, hyperstep_every, jit_compile, hyper_lr, warmup_steps,
           steps_per_execution, solve, **kwargs):
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([keras.Input((d,)), keras.layers.Dense(32, activation="relu"),
                                keras.layers.Dense(bottleneck, activation="relu")], name="encoder")
    pt_head = keras.Sequential([keras.Input((bottleneck,)), keras.layers.Dense(num_tasks)],
                               name="pt_head")
    ft_head = keras.Sequential([keras.Input((bottleneck,)), keras.layers.Dense(1)], name="ft_head")
    model = km.MetaPretrainer(
        encoder, pt_head, ft_head, TaskWeights(num_tasks),
        pt_loss=lambda y, p, w: masked_multitask_bce(y, p, w),
        ft_loss=lambda y, p: tf.reduce_mean(keras.losses.binary_crossentropy(y, p, from_logits=True)),
        hyperstep_every=hyperstep_every, warmup_steps=warmup_steps,
        **({"solve": solve} if solve is not None else {}), **kwargs)
    model.compile(keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2),
                  keras.optimizers.Adam(hyper_lr), jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    return model


def stream(seed, x, y, x_ft, y_ft):
    half = len(x_ft) // 2
    return km.meta_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
        .batch(64, drop_remainder=True),
        tf.data.Dataset.from_tensor_slices((x_ft[:half], y_ft[:half])).shuffle(half, seed=seed)
        .batch(32, drop_remainder=True),
        tf.data.Dataset.from_tensor_slices((x_ft[half:], y_ft[half:])).shuffle(half, seed=seed)
        .batch(half, drop_remainder=True))


class Sleep(keras.callbacks.Callback):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def main(out_dir, epochs, sleep=0.0):
    tf.config.experimental.enable_op_determinism()
    x, y, x_ft, y_ft, _ = synthetic_tasks(0)
    model = build(0, y.shape[1])
    callbacks = [MetaCheckpoint(os.path.join(out_dir, "ckpt"))]
    if sleep:
        callbacks.append(Sleep(sleep))
    model.fit(stream(0, x, y, x_ft, y_ft), epochs=epochs, steps_per_epoch=50, verbose=0,
              callbacks=callbacks)
    np.save(os.path.join(out_dir, "phi.npy"), model.meta_parameters()[0])


if __name__ == "__main__":
    args = sys.argv[1:]
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    main(args[0], int(args[1]), sleep)
