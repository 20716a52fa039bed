"""Two Meta-Weight-Net steps on one device and on 2 logical CPUs (MirroredStrategy), for
tests/test_reweighting.py:

    python -m tests.mwn_data_parallel OUT_FILE

For each arm (plain SGD; the MWN by one-step, EvoGrad and implicit hypergradients, and EvoGrad
with the MWN weighing the current losses, ``mwn_input="current"``, and the copies' mean
losses, ``"copies_mean"``) at a global
batch of 9 (shards of 5 + 4), and for plain SGD and one-step at a batch of 1 (one shard
empty), writes to OUT_FILE (.npz) the
losses, the change of the model's weights and of the MWN's weights, single and mirrored. The
network is an MLP (no batch statistics), the meta optimizer plain SGD (linear in the
hypergradient, so a hypergradient off by a factor shows), weight decay on.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.two_cpus import split_cpu_in_two  # noqa: E402

split_cpu_in_two()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_metapt as km  # noqa: E402
from keras_metapt import nets, optim  # noqa: E402
from keras_metapt.reweighting import MetaWeightNetTrainer  # noqa: E402

ARMS = ("plain", "one_step", "evograd", "implicit", "evograd_current", "evograd_copies_mean")


def estimator(arm, reduce):
    if arm == "one_step":
        return km.Unrolled(optim.sgd(0.1), num_steps=1, gradient_reduction=reduce)
    if arm.startswith("evograd"):
        return km.EvoGrad(num_copies=3, sigma=0.05, temperature=0.05, gradient_reduction=reduce)
    return km.Implicit(km.linalg.neumann(3), gradient_reduction=reduce)


def trainer(arm, strategy):
    reduce = km.distribute.replica_sum if strategy.num_replicas_in_sync > 1 else None
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = nets.image_classifier("mlp", 1, 10)
        if arm == "plain":
            return MetaWeightNetTrainer(model, learning_rate=0.1, weight_decay=0.05,
                                        strategy=strategy)
        mwn = km.hyper.MetaWeightNet(8, seed=2)
        meta_optimizer = keras.optimizers.SGD(1.0)
        return MetaWeightNetTrainer(model, learning_rate=0.1, weight_decay=0.05, mwn=mwn,
                                    meta_optimizer=meta_optimizer,
                                    estimator=estimator(arm, reduce), seed=3,
                                    strategy=strategy,
                                    mwn_input=next((m for m in ("current", "copies_mean")
                                                    if arm.endswith(m)), "evaluated"))


def main(out_file):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(18, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 18).astype(np.int32)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for n in (9, 1):
        batch, meta_batch = (images[:n], labels[:n]), (images[9:9 + n], labels[9:9 + n])
        for arm in ARMS if n > 1 else ARMS[:2]:
            for name, strategy in (("single", tf.distribute.get_strategy()),
                                   ("mirrored", mirrored)):
                t = trainer(arm, strategy)
                before = [v.numpy().copy() for v in t.model.trainable_variables]
                mwn_before = [v.numpy().copy() for v in t.mwn.weight_variables()] if t.mwn else []
                losses = [[float(x) for x in t.train_step(batch, meta_batch)] for _ in range(2)]
                key = f"{arm}_{n}_{name}"
                out[f"{key}_losses"] = np.array(losses)
                out[f"{key}_weights"] = np.concatenate(
                    [(v.numpy() - b).ravel() for v, b in zip(t.model.trainable_variables, before)])
                out[f"{key}_mwn"] = np.concatenate(
                    [(v.numpy() - b).ravel() for v, b in zip(t.mwn.weight_variables(), mwn_before)]
                ) if t.mwn else np.zeros(1)
    np.savez(out_file, **out)


if __name__ == "__main__":
    main(sys.argv[1])
