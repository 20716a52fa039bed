"""The meta-PT toy run of tests/meta_pt_toy.py on fixed (unshuffled) global batches, for
comparing strategies: the same global batches give the same phi on any number of replicas.

    python -m tests.distributed_toy multiworker OUT_DIR STEPS

runs under `MultiWorkerMirroredStrategy` (configured by TF_CONFIG; one process per worker)
and writes OUT_DIR/phi_<task index>.npy;

    python -m tests.distributed_toy mirrored OUT_DIR STEPS K TERMS SOLVER PT_BATCH FT_BATCH

splits the CPU into 2 logical devices, runs the same fit on the default strategy and under
`MirroredStrategy` over both devices, and writes OUT_DIR/phi_single.npy and
OUT_DIR/phi_mirrored.npy.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_metapt as km  # noqa: E402
from tests import meta_pt_toy as toy  # noqa: E402

WARMUP = 3


def stream(x, y, x_ft, y_ft, unroll_steps=1, pt_batch=64, ft_batch=32):
    half = len(x_ft) // 2
    slices = tf.data.Dataset.from_tensor_slices
    return km.meta_dataset(slices((x, y)).batch(pt_batch, drop_remainder=True),
                           slices((x_ft[:half], y_ft[:half])).batch(ft_batch, drop_remainder=True),
                           slices((x_ft[half:], y_ft[half:])).batch(half, drop_remainder=True),
                           unroll_steps)


def build_and_fit(strategy, steps, unroll_steps=1, neumann_terms=1, solver="neumann", pt_batch=64,
                  ft_batch=32):
    """Fits the toy under ``strategy`` for ``steps`` steps (the first WARMUP without
    hypersteps, then a hyperstep every step); returns the model."""
    x, y, x_ft, y_ft, _ = toy.synthetic_tasks(0)
    with strategy.scope():
        model = toy.build(0, y.shape[1], warmup_steps=WARMUP, hyperstep_every=1)
        model.unroll_steps, model.neumann_terms, model.solver = unroll_steps, neumann_terms, solver
        model.compile(model.optimizer.__class__(1e-2), model.ft_optimizer.__class__(1e-2),
                      model.hyper_optimizer.__class__(1e-2))
    model.fit(stream(x, y, x_ft, y_ft, unroll_steps, pt_batch, ft_batch), epochs=1, steps_per_epoch=steps, verbose=0)
    return model


def main(mode, out_dir, steps, *config):
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    if mode == "multiworker":
        model = build_and_fit(km.distribute.get_strategy("multiworker"), steps)
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        np.save(os.path.join(out_dir, f"phi_{index}.npy"), model.meta_parameters()[0])
        return
    k, terms, solver, pt_batch, ft_batch = int(config[0]), int(config[1]), config[2], int(
        config[3]), int(config[4])
    for name, strategy in (("single", tf.distribute.get_strategy()),
                           ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        model = build_and_fit(strategy, steps, k, terms, solver, pt_batch, ft_batch)
        np.save(os.path.join(out_dir, f"phi_{name}.npy"), model.meta_parameters()[0])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
