"""Training a classifier on per-example weighted losses whose weights come from a
Meta-Weight-Net meta-learned online (Shu et al. 2019), with any hypergradient estimator.

Each `MetaWeightNetTrainer.train_step(batch, meta_batch)`:
  1. hypergradient of the meta batch's mean cross-entropy with respect to the MWN weights phi
     (inner loss: sum_i l_i v_i / sum_i v_i with v = MWN(l); outer: the meta loss), by the
     estimator given: `Unrolled(sgd(lr), 1)` is the original's one-step look-ahead (its rate is
     the trainer's current SGD rate), `EvoGrad` the first-order one, `Implicit` the IFT;
  2. one step of the meta optimizer on phi;
  3. the real SGD step on the weighted loss with the updated phi (BatchNorm moving statistics
     kept from this step only).
The MWN's input is the detached loss, so the weights are constants of the inner loss in theta:
an HVP (`Implicit`) sees H = sum_i v_i Hess l_i / sum v.

Which losses the MWN weighs inside the hypergradient (``mwn_input``): "evaluated" (default, as
the original Meta-Weight-Net and EvoGrad codes) takes the losses at the weights the inner
loss is evaluated at -- each EvoGrad copy, each step of a longer unroll, HyperDistill's
distilled point -- so the weights differ between EvoGrad's copies and the copies' loss gaps
carry d v / d l; "current" takes the losses of the model's current weights, computed once per
step (one extra forward pass) and shared by every evaluation; "copies_mean" (`EvoGrad`
only) takes the mean over EvoGrad's K copies of their per-example losses, (1/K) sum_k
l_i(theta + eps_k), and weighs every copy at it: the copies share their weights as with
"current", without the extra forward pass (the mean differs from l_i(theta) by
g_i . mean_k eps_k + O(sigma^2)). The one-step look-ahead and `Implicit` evaluate at the
current weights, so they are the same with "evaluated" and "current". With "current" (and,
to first order in sigma, "copies_mean") EvoGrad's mean over its noise is the original one-step
hypergradient (stopped input) at its rate eta; with "evaluated" it is the look-ahead
differentiated through the MWN's input as well (`benchmarks.evograd_agreement` measures all
three).
Without a Meta-Weight-Net the step is plain SGD on the mean cross-entropy. The SGD is Keras'
(velocity v <- mu v - lr g, so after a change of the rate the velocity still carries the old
rate for about 1 / (1 - mu) steps; PyTorch keeps the rate outside the velocity). Cost per step:
the estimator's (e.g. EvoGrad: K forwards + 1 backward; one-step: about 3 gradients) plus one
gradient.

Data-parallel (a ``strategy`` with R > 1 replicas; model, Meta-Weight-Net and meta optimizer
created under ``strategy.scope()``, the estimator given ``gradient_reduction=
distribute.replica_sum``): ``train_step`` splits each global batch into R contiguous shards.
Every loss is the replica's share of the global-batch value: the mean losses are scaled by
n_r / N, and the weighted loss is sum_{i in shard} l_i v_i / sum_{all i} v_i (the
denominator summed over replicas), so the shares add up to the one-device losses; gradients
and hypergradients are summed over replicas. Batch normalisation normalises each shard by its
own statistics (as tf.distribute and PyTorch's DistributedDataParallel do by default), and
the moving statistics kept are the mean of the replicas' updates, the same on every replica.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import distribute, functional
from keras_metapt.hyper.example_weights import meta_weight_net_weights, normalised_weighted_loss
from keras_metapt.hypergrad.evograd import EvoGrad
from keras_metapt.hypergrad.problem import BilevelProblem

__all__ = ["per_example_cross_entropy", "MetaWeightNetTrainer", "MWN_INPUTS"]

MWN_INPUTS = ("evaluated", "current", "copies_mean")


def per_example_cross_entropy(logits, labels):
    """-log softmax(logits)[label] per row, as log-softmax and a one-hot select (plain ops:
    deterministic under op determinism and differentiable inside XLA loops)."""
    num_classes = logits.shape[-1]
    return -tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=logits.dtype)
                          * tf.nn.log_softmax(logits), axis=-1)


def _check_mwn_input(mwn_input):
    if mwn_input not in MWN_INPUTS:
        raise ValueError(f"mwn_input must be one of {MWN_INPUTS}, got {mwn_input!r}")


class MetaWeightNetTrainer:
    """SGD (momentum, L2 added to the gradients) on ``model``, optionally with a
    `keras_metapt.hyper.MetaWeightNet` meta-learned by ``estimator`` and ``meta_optimizer``.

    Args:
      model: a built Keras classifier (images -> logits).
      learning_rate, momentum, weight_decay: the SGD step; ``optimizer.learning_rate`` can be
        reassigned between steps (a schedule); the one-step look-ahead's rate and the
        Neumann step of `linalg.neumann(alpha=None)` follow it.
      mwn, meta_optimizer, estimator: all three or none.
      seed: the EvoGrad noise of step s is drawn from the stateless seed (seed, s).
      mwn_input: "evaluated", "current" or "copies_mean" (an `EvoGrad` estimator only); see
        the module doc.
      jit_compile: compile the steps with XLA.
      strategy: a `tf.distribute.Strategy` (default: the current one); see the module doc.
    `train_step(batch, meta_batch)` runs one step; ``compiled_step`` is its tf.function (on
    the replicas' shards with several replicas); `hyperstep` is its first part, the MWN's
    update (then the weighted SGD step runs, after it). `problem()` is the bilevel problem the
    estimator is given, `example_losses(params, batch)` the per-example losses it weighs.
    `checkpoint_items()` names the state to checkpoint (model, optimizers, MWN, step).
    """

    def __init__(self, model, *, learning_rate, momentum=0.9, weight_decay=0.0, mwn=None,
                 meta_optimizer=None, estimator=None, seed=0, jit_compile=False, strategy=None,
                 mwn_input="evaluated"):
        if (mwn is None) != (estimator is None) or (mwn is None) != (meta_optimizer is None):
            raise ValueError("give mwn, meta_optimizer and estimator together, or none of them")
        _check_mwn_input(mwn_input)
        if mwn_input == "copies_mean" and not isinstance(estimator, EvoGrad):
            raise ValueError(f"mwn_input='copies_mean' weighs EvoGrad's copies at their mean "
                             f"losses: it needs an EvoGrad estimator, got "
                             f"{type(estimator).__name__}")
        self.mwn_input = mwn_input
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        if (self.replicas > 1 and estimator is not None
                and estimator.gradient_reduction is not distribute.replica_sum):
            raise ValueError(f"{self.replicas} replicas: give the estimator "
                             "gradient_reduction=keras_metapt.distribute.replica_sum")
        self.model = model
        self.weight_decay = float(weight_decay)
        self.mwn, self.meta_optimizer, self.estimator = mwn, meta_optimizer, estimator
        with self.strategy.scope():
            self.optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
            self.optimizer.build(model.trainable_variables)
            if mwn is not None:
                meta_optimizer.build(mwn.weight_variables())
            self.step = tf.Variable(0, dtype=tf.int64, name="step")
        if hasattr(estimator, "start"):  # an online estimator (HyperDistill) keeps w_0
            estimator.start([v.value for v in model.trainable_variables])
        self.seed = int(seed)
        if self.replicas == 1:
            self.compiled_step = tf.function(self._train_step, jit_compile=jit_compile)
        else:
            def distributed_step(batch, meta_batch):
                shares = self.strategy.run(self._train_step, args=(batch, meta_batch))
                return tuple(self.strategy.reduce("SUM", x, axis=None) for x in shares)
            self.compiled_step = tf.function(distributed_step, jit_compile=jit_compile)
        self._predict = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile,
                                    reduce_retracing=True)

    def checkpoint_items(self):
        items = {"model": self.model, "optimizer": self.optimizer, "step": self.step}
        if self.mwn is not None:
            items.update(mwn=self.mwn, meta_optimizer=self.meta_optimizer)
            items.update(getattr(self.estimator, "checkpoint_items", dict)())
        return items

    def example_losses(self, params, batch):
        """Per-example cross-entropy of ``params`` on ``batch`` (training mode, at the current
        BatchNorm statistics, which are not updated)."""
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        logits, _ = functional.stateless_apply(self.model, params, non_trainable, batch[0],
                                               training=True)
        return per_example_cross_entropy(logits, batch[1])

    def problem(self, mwn_input_losses=None, mwn_input=None):
        """The bilevel problem at the current BatchNorm statistics (both losses run the model
        in training mode, as the original's meta step; their statistics are not kept).
        ``mwn_input_losses``: the losses the MWN weighs in every evaluation of the inner loss
        (``mwn_input="current"``); None: the evaluated weights' own losses, or with
        ``mwn_input="copies_mean"`` (default: the trainer's) the mean of the losses at the
        points given together to ``inner_loss_at_points`` (EvoGrad's copies)."""
        mwn_input = mwn_input or self.mwn_input
        _check_mwn_input(mwn_input)
        if mwn_input == "copies_mean" and mwn_input_losses is not None:
            raise ValueError("mwn_input='copies_mean' weighs the copies' own mean losses: "
                             "give no mwn_input_losses")
        losses = self.example_losses

        def inner_loss(params, mwn, batch):
            values = losses(params, batch)
            weighed = values if mwn_input_losses is None else mwn_input_losses
            return self._weighted_share(values, meta_weight_net_weights(mwn, weighed))

        def outer_loss(params, mwn, batch):
            del mwn
            return self._mean_share(losses(params, batch), batch)

        def inner_loss_at_points(points, mwn, batch):
            values = tf.stack([losses(p, batch) for p in points])  # [K, batch]
            weights = meta_weight_net_weights(
                mwn, tf.stop_gradient(tf.reduce_mean(values, axis=0)))
            return tf.stack([self._weighted_share(v, weights) for v in tf.unstack(values)])

        rate = self.optimizer.learning_rate  # the variable: read at every step
        at_points = inner_loss_at_points if mwn_input == "copies_mean" else None
        return BilevelProblem(inner_loss, outer_loss,
                              inner_optimizer_hparams=lambda h, s, n: {"learning_rate": rate},
                              inner_learning_rate=rate, inner_loss_at_points=at_points)

    def train_step(self, batch, meta_batch):
        """One step on the global ``batch`` and ``meta_batch`` ((images, labels) each):
        (training loss, meta loss before the step; 0 without a Meta-Weight-Net), the
        global-batch values."""
        if self.replicas > 1:
            batch = distribute.shard_for_replicas(self.strategy, batch)
            meta_batch = distribute.shard_for_replicas(self.strategy, meta_batch)
        else:
            batch, meta_batch = tf.nest.map_structure(tf.convert_to_tensor, (batch, meta_batch))
        return self.compiled_step(batch, meta_batch)

    def _mean_share(self, values, batch):
        """The replica's share of the global batch's mean of ``values`` (the mean itself on
        one replica)."""
        if self.replicas == 1:
            return tf.reduce_mean(values)
        # sum / global count: an empty shard (a batch smaller than R) adds 0, not NaN
        count = tf.cast(tf.shape(values)[0], values.dtype)
        return tf.reduce_sum(values) / distribute.replica_sum(count)

    def _weighted_share(self, values, weights):
        """The replica's share of sum_i l_i v_i / sum_i v_i over the global batch."""
        if self.replicas == 1:
            return normalised_weighted_loss(values, weights)
        total = distribute.replica_sum(tf.reduce_sum(weights))
        weighted = tf.reduce_sum(values * weights)
        return tf.where(total > 0, weighted / tf.where(total > 0, total, 1.0), weighted)

    def _sgd_step(self, batch, mwn_values):
        variables = self.model.trainable_variables
        params = [v.value for v in variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(params)
            logits, new_state = functional.stateless_apply(self.model, params, non_trainable,
                                                           batch[0], training=True)
            values = per_example_cross_entropy(logits, batch[1])
            if mwn_values is None:
                loss = self._mean_share(values, batch)
            else:
                loss = self._weighted_share(values, meta_weight_net_weights(mwn_values, values))
        grads = tape.gradient(loss, params)
        # Keras optimizers sum the replicas' gradients: each adds 1/R of the decay
        decay = self.weight_decay / self.replicas
        self.optimizer.apply_gradients(
            [(g + tf.cast(decay, g.dtype) * p, v) for g, p, v in zip(grads, params, variables)])
        if self.replicas > 1:  # the same statistics on every replica: their mean
            floats = [i for i, x in enumerate(new_state) if x.dtype.is_floating]
            summed = distribute.replica_sum([new_state[i] for i in floats])
            new_state = list(new_state)
            for i, value in zip(floats, summed):
                new_state[i] = value / tf.cast(self.replicas, value.dtype)
        for var, value in zip(self.model.non_trainable_variables, new_state):
            var.assign(value)
        return loss

    def hyperstep(self, batch, meta_batch):
        """The Meta-Weight-Net's update alone: the estimator's hypergradient and one step of
        ``meta_optimizer`` (the model is not stepped). Returns (meta loss before the update,
        the MWN's new values). Under ``strategy.run``, this replica's share of the loss."""
        if self.mwn is None:
            raise ValueError("hyperstep needs a trainer with a Meta-Weight-Net")
        seed = tf.stack([tf.constant(self.seed, tf.int64), self.step.read_value()])
        params = [v.value for v in self.model.trainable_variables]
        current = (tf.stop_gradient(self.example_losses(params, batch))
                   if self.mwn_input == "current" else None)
        result = self.estimator(self.problem(current), params, self.mwn.hparams(), batch,
                                meta_batch, seed=seed)
        # the hypergradient is the same on every replica, and Keras sums over replicas
        hypergrad = result.hypergrad if self.replicas == 1 else [
            g / tf.cast(self.replicas, g.dtype) for g in result.hypergrad]
        self.meta_optimizer.apply_gradients(zip(hypergrad, self.mwn.weight_variables()))
        meta_loss = result.outer_loss
        if self.replicas > 1:  # the global value on every replica: each reports 1/R
            meta_loss = meta_loss / tf.cast(self.replicas, meta_loss.dtype)
        return meta_loss, self.mwn.hparams()

    def _train_step(self, batch, meta_batch):
        """(training loss, meta loss before the step; 0 without a Meta-Weight-Net): with
        several replicas, this replica's shares of them."""
        if self.mwn is None:
            loss, meta_loss = self._sgd_step(batch, None), tf.constant(0.0)
        else:
            meta_loss, mwn_values = self.hyperstep(batch, meta_batch)
            # the weighted step runs after the hyperstep, not beside it: the step holds the
            # activations of one of them at a time (the SGD forward does not wait for phi)
            with tf.control_dependencies(tf.nest.flatten(mwn_values) + [meta_loss]):
                loss = self._sgd_step(batch, mwn_values)
        self.step.assign_add(1)
        return loss, meta_loss

    def _batched(self, x, fn, batch_size):
        return np.concatenate([fn(self._predict(tf.constant(x[i:i + batch_size])), i)
                               for i in range(0, len(x), batch_size)])

    def accuracy(self, x, y, batch_size=1000):
        """Fraction of ``x`` classified as ``y`` (evaluation mode)."""
        hits = self._batched(x, lambda logits, i: np.argmax(logits.numpy(), -1)
                             == y[i:i + batch_size], batch_size)
        return float(hits.mean())

    def example_weights(self, x, y, batch_size=1000):
        """The Meta-Weight-Net's weight of every example at its evaluation-mode loss."""
        if self.mwn is None:
            raise ValueError("example_weights needs a trainer with a Meta-Weight-Net")
        return self._batched(x, lambda logits, i: self.mwn(per_example_cross_entropy(
            logits, tf.constant(y[i:i + batch_size]))).numpy(), batch_size)
