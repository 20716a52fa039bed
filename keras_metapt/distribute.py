"""Strategy selection and the cross-replica reductions of data-parallel meta-training.

Data parallelism over R replicas: each replica holds a shard of every batch (n_r of the global
N examples). A loss that is a mean over its batch is computed on each replica as
(n_r / N) * mean over the shard (`shard_fraction`), so the *sum* over replicas is the mean over
the global batch, also for unequal shards. Every gradient-like quantity (gradients, HVPs,
mixed VJPs) is then summed over replicas with `replica_sum`, which makes it identical on every
replica and equal to the single-device value on the global batch.

`replica_sum` is an all-reduce whose gradient is again an all-reduce, so differentiating
through a sum (an unrolled step on reduced gradients) stays exact. Strategies forbid
all-reduces inside `tf.while_loop`, so estimators given a reduction trace their loops in
Python (the loop lengths are static and small: K FT steps, i Neumann terms, CG iterations).
"""

import os

import numpy as np
import tensorflow as tf

__all__ = ["STRATEGIES", "get_strategy", "is_multi_worker", "num_replicas", "replica_sum",
           "shard_fraction", "shard_for_replicas", "run_if_finite"]

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


def get_strategy(name="default", tpu_address=None, devices=None):
    """A `tf.distribute.Strategy` by name.

    default: the current (default, single-device) strategy. mirrored: `MirroredStrategy` over
    ``devices`` (e.g. ["/gpu:0", "/gpu:1"]; default all local GPUs, or the CPU). multiworker: `MultiWorkerMirroredStrategy`, configured by the
    TF_CONFIG environment variable (one process per worker, the same command on each).
    tpu: `TPUStrategy` on the TPU at ``tpu_address`` ("" or None: the local TPU VM).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(list(devices) if devices else None)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multiworker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker); see README 'Scaling out'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def is_multi_worker(strategy):
    """True for a `MultiWorkerMirroredStrategy` spanning several workers."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # noqa: SLF001 (no public API)


def num_replicas():
    """Replicas in sync in the current context (1 outside any strategy)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        return tf.distribute.get_strategy().num_replicas_in_sync
    return ctx.num_replicas_in_sync


def replica_sum(tree):
    """Sum of a nest over the replicas in sync; None leaves stay None.

    The identity with one replica. In a replica context with several, one batched
    all-reduce (its gradient is an all-reduce too). Must not run inside tf.while_loop/tf.cond.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tree
    flat = tf.nest.flatten(tree)
    present = [i for i, leaf in enumerate(flat) if leaf is not None]
    if not present:
        return tree
    # Sparse gradients (embedding lookups) are summed dense: the solvers add and dot them.
    dense = [tf.convert_to_tensor(flat[i]) for i in present]
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dense)
    out = list(flat)
    for i, value in zip(present, reduced):
        out[i] = value
    return tf.nest.pack_sequence_as(tree, out)


def shard_fraction(batch, dtype=tf.float32):
    """n_r / N: this replica's share of the global batch (leading dimension of the batch's
    first leaf); 1.0 with one replica."""
    if num_replicas() == 1:
        return tf.constant(1.0, dtype)
    local = tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], dtype)
    return local / replica_sum(local)


def shard_for_replicas(strategy, arrays):
    """A global batch (a tuple of arrays with one leading dimension) split for ``strategy``:
    replica r gets the r-th of R contiguous slices of every array (`np.array_split`'s), as a
    DistributedValues of tensors to pass to ``strategy.run``."""
    def value_fn(ctx):
        parts = np.array_split(np.arange(len(arrays[0])), ctx.num_replicas_in_sync)
        rows = parts[ctx.replica_id_in_sync_group]
        return tuple(tf.constant(np.asarray(a)[rows]) for a in arrays)
    return strategy.experimental_distribute_values_from_function(value_fn)


def run_if_finite(update, args, is_finite):
    """Runs ``update(*args)`` on every replica if ``is_finite`` (a scalar bool, the same on every
    replica), else nothing; returns int32 1 when skipped, 0 when run.

    Keras optimizer updates may not sit inside a tf.cond in a replica context, so the choice is
    made in the cross-replica context (`merge_call`), and the update runs for each replica from
    there. Works with one replica (the default strategy) too.
    """
    def decide(strategy, args, finite):
        def run():
            strategy.extended.call_for_each_replica(update, args=args)
            return tf.constant(0, tf.int32)
        finite = strategy.experimental_local_results(finite)[0]
        return tf.cond(finite, run, lambda: tf.constant(1, tf.int32))

    return tf.distribute.get_replica_context().merge_call(decide, args=(args, is_finite))
