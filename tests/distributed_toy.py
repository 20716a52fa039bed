"""The meta-PT toy run of tests/meta_pt_toy.py on fixed (unshuffled) global batches, for
comparing strategies: the same global batches give the same phi on any number of replicas.

    python -m tests.distributed_toy multiworker OUT_DIR STEPS

runs under `MultiWorkerMirroredStrategy` (configured by TF_CONFIG; one process per worker)
and writes OUT_DIR/phi_<task index>.npy;

    python -m tests.distributed_toy mirrored OUT_DIR STEPS K TERMS SOLVER PT_BATCH FT_BATCH

splits the CPU into 2 logical devices, runs the same fit on the default strategy and under
`MirroredStrategy` over both devices, and writes OUT_DIR/phi_single.npy and
OUT_DIR/phi_mirrored.npy;

    python -m tests.distributed_toy estimators OUT_DIR 0

computes every estimator's hypergradient of a float64 weighted ridge problem on one device and
under `MirroredStrategy` over 2 logical devices (the global batch of 9 split 5 + 4), and
writes OUT_DIR/estimators.npz (name_single, name_mirrored);

    python -m tests.distributed_toy nonfinite OUT_DIR 0

fits with a NaN-poisoned FT loss under `MirroredStrategy` over 2 logical devices and writes
OUT_DIR/nonfinite.npz (phi, the error message);

    python -m tests.distributed_toy float16 OUT_DIR STEPS

fits under mixed_float16 from a hyper loss scale of 2^60 (overflowing hypersteps) on one device
and on 2 logical devices and writes OUT_DIR/float16_{single,mirrored}.npz (phi, the final
scale, the hyper optimizer's step count).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_metapt as km  # noqa: E402
from tests import meta_pt_toy as toy  # noqa: E402
from tests.two_cpus import split_cpu_in_two  # noqa: E402

WARMUP = 3


def stream(x, y, x_ft, y_ft, unroll_steps=1, pt_batch=64, ft_batch=32):
    half = len(x_ft) // 2
    slices = tf.data.Dataset.from_tensor_slices
    return km.meta_dataset(slices((x, y)).batch(pt_batch, drop_remainder=True),
                           slices((x_ft[:half], y_ft[:half])).batch(ft_batch, drop_remainder=True),
                           slices((x_ft[half:], y_ft[half:])).batch(half, drop_remainder=True),
                           unroll_steps)


def build_and_fit(strategy, steps, unroll_steps=1, neumann_terms=1, solver="neumann", pt_batch=64,
                  ft_batch=32, **build_kwargs):
    """Fits the toy under ``strategy`` for ``steps`` steps (the first WARMUP without
    hypersteps, then a hyperstep every step); returns the model."""
    x, y, x_ft, y_ft, _ = toy.synthetic_tasks(0)
    with strategy.scope():
        model = toy.build(0, y.shape[1], warmup_steps=WARMUP, hyperstep_every=1, **build_kwargs)
        model.unroll_steps = unroll_steps
        model.solve = (km.linalg.neumann(neumann_terms) if solver == "neumann"
                       else km.linalg.cg(10))
        model.compile(keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2),
                      keras.optimizers.Adam(1e-2))  # the toy's optimizers, built in the scope
    model.fit(stream(x, y, x_ft, y_ft, unroll_steps, pt_batch, ft_batch), epochs=1, steps_per_epoch=steps, verbose=0)
    return model


def _estimator_problem():
    """Ridge with a learned log-penalty; every loss is the replica share of its global mean."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4))
    y = x @ rng.normal(size=4) + 0.3 * rng.normal(size=9)
    xv = rng.normal(size=(9, 4))
    yv = xv @ rng.normal(size=4)

    def share(batch):
        return km.distribute.shard_fraction(batch[0], tf.float64)

    def inner(w, h, batch):
        xb, yb = batch
        residual = tf.linalg.matvec(xb, w) - yb
        return share(batch) * (tf.reduce_mean(residual ** 2) + tf.exp(h[0]) * tf.reduce_sum(w ** 2))

    def outer(w, h, batch):
        xb, yb = batch
        return share(batch) * tf.reduce_mean((tf.linalg.matvec(xb, w) - yb) ** 2)

    problem = km.BilevelProblem(inner, outer)
    w0 = tf.constant(rng.normal(size=4))
    h0 = [tf.constant(-1.0, tf.float64)]
    return problem, w0, h0, (x, y), (xv, yv)


def estimator_hypergradients(reduce):
    sgd = optim_sgd()
    from keras_metapt import optim
    adam = optim.adam(0.05)
    adam_state = (tf.constant(3), tf.constant([0.1, -0.2, 0.05, 0.3], tf.float64),
                  tf.constant([0.02, 0.01, 0.04, 0.03], tf.float64))
    seed = tf.constant([3, 4], tf.int64)
    return {
        "unrolled": (km.Unrolled(sgd, 4, gradient_reduction=reduce), {}),
        "unrolled_truncated": (km.Unrolled(sgd, 4, truncate=1, gradient_reduction=reduce), {}),
        "implicit_neumann": (km.Implicit(km.linalg.neumann(5, alpha=0.1),
                                         gradient_reduction=reduce), {}),
        "implicit_cg": (km.Implicit(km.linalg.cg(4), gradient_reduction=reduce), {}),
        "evograd": (km.EvoGrad(3, sigma=0.1, temperature=0.5, gradient_reduction=reduce),
                    {"seed": seed}),
        "sama": (km.SAMA(sgd, gradient_reduction=reduce), {}),
        "sama_adam": (km.SAMA(adam, gradient_reduction=reduce), {"opt_state": adam_state}),
    }


def run_estimators(out_dir):
    problem, w0, h0, inner_batch, outer_batch = _estimator_problem()
    results = {}
    for name, (estimator, kwargs) in estimator_hypergradients(None).items():
        results[f"{name}_single"] = estimator(problem, w0, h0, inner_batch, outer_batch,
                                              **kwargs).hypergrad[0].numpy()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    cuts = {0: slice(0, 5), 1: slice(5, 9)}  # unequal shards

    def shard(batch):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tuple(tf.constant(a[cuts[ctx.replica_id_in_sync_group]]) for a in batch))

    inner_dist, outer_dist = shard(inner_batch), shard(outer_batch)
    for name, (estimator, kwargs) in estimator_hypergradients(km.distribute.replica_sum).items():
        @tf.function
        def step(ib, ob, estimator=estimator, kwargs=kwargs):
            return strategy.run(lambda i, o: estimator(problem, w0, h0, i, o, **kwargs).hypergrad[0],
                                args=(ib, ob))
        per_replica = strategy.experimental_local_results(step(inner_dist, outer_dist))
        results[f"{name}_mirrored"] = np.stack([v.numpy() for v in per_replica])
    try:  # forward mode refuses to run on several replicas
        strategy.run(lambda i, o: km.Forward(optim_sgd(), 2)(problem, w0, h0, i, o).hypergrad,
                     args=(inner_dist, outer_dist))
        results["forward_refused"] = np.array(0)
    except ValueError as error:
        results["forward_refused"] = np.array(int("Forward runs on one replica" in str(error)))
    np.savez(os.path.join(out_dir, "estimators.npz"), **results)


def optim_sgd():
    from keras_metapt import optim
    return optim.sgd(0.1)


def main(mode, out_dir, steps, *config):
    if mode in ("mirrored", "estimators", "nonfinite", "float16", "float16_shard_overflow"):
        split_cpu_in_two()
    tf.config.experimental.enable_op_determinism()
    if mode == "estimators":
        run_estimators(out_dir)
        return
    if mode == "nonfinite":  # a poisoned FT loss under MirroredStrategy: fit must stop, phi kept
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        x, y, x_ft, y_ft, _ = toy.synthetic_tasks(0)
        with strategy.scope():
            model = toy.build(0, y.shape[1], warmup_steps=1, hyperstep_every=1)
        model.ft_loss_fn = lambda y_true, p: tf.reduce_mean(p) * np.nan
        try:
            model.fit(stream(x, y, x_ft, y_ft), epochs=1, steps_per_epoch=4, verbose=0)
            outcome = "no error"
        except km.NonFiniteHypergradientError as error:
            outcome = str(error)
        np.savez(os.path.join(out_dir, "nonfinite.npz"), phi=model.meta_parameters()[0],
                 outcome=np.array(outcome))
        return
    if mode == "float16":  # mixed_float16 with overflowing hypersteps, one device and two
        for name, strategy in (("single", tf.distribute.get_strategy()),
                               ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
            model = build_and_fit(strategy, steps, policy="mixed_float16",
                                  hyper_loss_scale=2.0 ** 60)
            np.savez(os.path.join(out_dir, f"float16_{name}.npz"),
                     phi=model.meta_parameters()[0], scale=model.hyper_loss_scale.numpy(),
                     hyper_steps=model.hyper_optimizer.iterations.numpy())
        return
    if mode == "float16_shard_overflow":  # an Inf in replica 1's half of the first PT batch
        x, y, x_ft, y_ft, _ = toy.synthetic_tasks(0)
        x = x.copy()
        x[40, 0] = np.inf
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            model = toy.build(0, y.shape[1], warmup_steps=5, policy="mixed_float16")
        model.fit(stream(x, y, x_ft, y_ft), epochs=1, steps_per_epoch=1, verbose=0)
        np.savez(os.path.join(out_dir, "shard_overflow.npz"),
                 finite=all(np.all(np.isfinite(v.numpy())) for v in model.variables),
                 scale=model.optimizer.dynamic_scale.numpy(),
                 iterations=model.optimizer.iterations.numpy())
        return
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
