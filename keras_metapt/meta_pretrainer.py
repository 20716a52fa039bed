"""MetaPretrainer: meta-learning pre-training hyperparameters inside `model.fit()`.

The training loop of Raghu et al. (2021), one PT batch per step:

  1. every step: one PT optimizer step on L_PT(theta_P, phi);
  2. warm-up (default: the first epoch): an FT-head step on detached encoder features of a
     MetaTrain batch;
  3. every N steps after warm-up, a hyperstep: K differentiable FT-head steps with the
     features attached, an implicit (Neumann or CG) solve over the PT Hessian on a fresh PT
     batch, and one hyper-optimizer step on phi (see `keras_metapt.hypergrad.PTFT`); the FT
     head takes the K-step value psi_K;
  4. other steps: an FT-head step on detached features of a MetaTrain batch.

Data: one element per step from `meta_dataset(pt, meta_train, meta_val, unroll_steps)`, a dict
with keys "pt", "pt_fresh", "meta_train" (K batches stacked along axis 1, so that the leading
axis stays the example axis that tf.distribute shards) and "meta_val".

BatchNorm and Dropout: the PT step runs with training=True (it updates BatchNorm statistics);
the FT-head steps and the hyperstep run with ``hyperstep_training`` (default False: inference
mode). A hyperstep never updates BatchNorm statistics or any other non-trainable state.
"""

import numpy as np
import keras
import tensorflow as tf

from keras_metapt import distribute, optim
from keras_metapt.callbacks import MetaCheckpoint, StopOnNonFiniteHypergradient
from keras_metapt.errors import InputMismatchError
from keras_metapt.hypergrad.problem import StepBatches
from keras_metapt.hypergrad.ptft import PTFT, PretrainFinetuneProblem

__all__ = ["MetaPretrainer", "meta_dataset"]

_ROLES = ("loss", "inputs")


def meta_dataset(pt, meta_train, meta_val, unroll_steps=1):
    """Zips batched datasets into the element stream `MetaPretrainer.fit` expects.

    Each input is a *batched* `tf.data.Dataset` of (x, y) or x; each is repeated forever, so
    pass ``steps_per_epoch`` to fit. "pt_fresh" is the PT stream one batch ahead (a fresh PT
    batch for the implicit stage); "meta_train" stacks ``unroll_steps`` consecutive MetaTrain
    batches along axis 1 (shape [batch, K, ...]: the example axis stays first, where
    tf.distribute splits a global batch across replicas),     batches, so its batches need a static size (``batch(..., drop_remainder=True)``).
    Deterministic inputs (seeded shuffles) give a deterministic stream, which is what exact
    resumption relies on.
    """
    unroll_steps = int(unroll_steps)
    for name, ds in (("pt", pt), ("meta_train", meta_train), ("meta_val", meta_val)):
        if not isinstance(ds, tf.data.Dataset):
            raise InputMismatchError(f"{name} must be a tf.data.Dataset, got {type(ds).__name__}")
        for spec in tf.nest.flatten(ds.element_spec):
            if spec.shape.rank is None or spec.shape.rank == 0 or spec.shape[0] is None:
                raise InputMismatchError(
                    f"{name} must be batched with a static batch size (use "
                    f".batch(n, drop_remainder=True)); its element has shape {spec.shape}")
    return tf.data.Dataset.zip({
        "pt": pt.repeat(),
        "pt_fresh": pt.repeat().skip(1),
        "meta_train": meta_train.repeat().batch(unroll_steps, drop_remainder=True)
        .map(_steps_to_axis_1),
        "meta_val": meta_val.repeat(),
    }).prefetch(tf.data.AUTOTUNE)


def _swap_first_axes(tree):
    """[a, b, ...] -> [b, a, ...] for every leaf: between the [K, batch, ...] of batching K
    MetaTrain batches, the [batch, K, ...] of the stream, and the [K, batch, ...] that
    `StepBatches` indexes."""
    return tf.nest.map_structure(
        lambda t: tf.transpose(t, [1, 0] + list(range(2, len(t.shape)))), tree)


def _steps_to_axis_1(*element):
    return _swap_first_axes(element[0] if len(element) == 1 else element)


def _split(batch):
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    return batch, None


def _initial_learning_rate(optimizer):
    lr = optimizer.learning_rate
    if callable(lr):
        lr = lr(0)
    return float(keras.ops.convert_to_numpy(lr))


class MetaPretrainer(keras.Model):
    """A Keras model that pre-trains an encoder while meta-learning the PT hyperparameters.

    Args:
      encoder: built Keras model, inputs -> features (theta_E).
      pt_head: built Keras model/layer, features -> PT predictions (theta_H).
      ft_head: built Keras model/layer, features -> FT predictions (psi).
      meta_layer: built Keras layer whose trainable weights are phi (`TaskWeights`, a
        `LearnedAugmentation`, or any layer).
      pt_loss: ``pt_loss(y_true, y_pred, meta_output) -> scalar``; ``meta_output`` is
        ``meta_layer(x)`` for meta_role "loss" and None for "inputs".
      ft_loss: ``ft_loss(y_true, y_pred) -> scalar``.
      meta_role: "loss" (phi shapes the loss, e.g. task weights) or "inputs" (the meta layer
        transforms PT inputs before the encoder, e.g. a learned augmentation).
      hyperstep_every: N, steps between hypersteps after warm-up (default 10).
      unroll_steps: K, differentiable FT-head steps per hyperstep (default 1).
      solver: "neumann" (default) or "cg" for the PT-stage inverse HVP.
      neumann_terms: i (default 1). neumann_alpha: default the PT learning rate.
      cg_iterations: CG iterations when solver="cg".
      warmup_steps: FT-head-only steps before the first hyperstep; default the first epoch.
      ft_unroll_optimizer: differentiable `optim.InnerOptimizer` for the FT unroll; default
        SGD at the FT optimizer's learning rate (fresh state every hyperstep).
      hyperstep_training: the training flag of encoder and heads in FT-head steps and
        hypersteps (BatchNorm/Dropout mode); default False (inference mode).

    Cost per hyperstep: K FT-head gradients through the encoder + 1 backward, i HVPs of the PT
    loss (or CG iterations), 1 mixed VJP. Memory: O(P).
    """

    def __init__(self, encoder, pt_head, ft_head, meta_layer, pt_loss, ft_loss, meta_role="loss",
                 hyperstep_every=10, unroll_steps=1, solver="neumann", neumann_terms=1,
                 neumann_alpha=None, cg_iterations=10, warmup_steps=None,
                 ft_unroll_optimizer=None, hyperstep_training=False, **kwargs):
        super().__init__(**kwargs)
        if meta_role not in _ROLES:
            raise ValueError(f"meta_role must be one of {_ROLES}, got {meta_role!r}")
        if int(hyperstep_every) < 1:
            raise ValueError(f"hyperstep_every must be >= 1, got {hyperstep_every}")
        for name, part in (("encoder", encoder), ("pt_head", pt_head), ("ft_head", ft_head),
                           ("meta_layer", meta_layer)):
            if not part.built:
                raise InputMismatchError(
                    f"{name} {part.name!r} is not built: build it (call it on example inputs or "
                    "give it a keras.Input) before creating the MetaPretrainer")
        if not meta_layer.trainable_variables:
            raise InputMismatchError(f"meta_layer {meta_layer.name!r} has no trainable weights "
                                     "(nothing to meta-learn)")
        self.encoder = encoder
        self.pt_head = pt_head
        self.ft_head = ft_head
        self.meta_layer = meta_layer
        self.pt_loss_fn = pt_loss
        self.ft_loss_fn = ft_loss
        self.meta_role = meta_role
        self.hyperstep_every = int(hyperstep_every)
        self.unroll_steps = int(unroll_steps)
        self.solver = solver
        self.neumann_terms = int(neumann_terms)
        self.neumann_alpha = neumann_alpha
        self.cg_iterations = int(cg_iterations)
        self.requested_warmup_steps = warmup_steps
        self.ft_unroll_optimizer = ft_unroll_optimizer
        self.hyperstep_training = bool(hyperstep_training)
        self.meta_step = keras.Variable(0, dtype="int64", trainable=False, name="meta_step")
        self.warmup_steps = keras.Variable(0 if warmup_steps is None else int(warmup_steps),
                                           dtype="int64", trainable=False, name="warmup_steps")
        self.pt_loss_tracker = keras.metrics.Mean(name="pt_loss")
        self.ft_train_loss_tracker = keras.metrics.Mean(name="ft_train_loss")
        self.ft_val_loss_tracker = keras.metrics.Mean(name="ft_val_loss")
        self.hypergrad_norm_tracker = keras.metrics.Mean(name="hypergrad_norm")
        self.hypersteps_tracker = keras.metrics.Sum(name="hypersteps")
        self.nonfinite_tracker = keras.metrics.Sum(name="nonfinite_hypersteps")
        self.phi_stats = {k: keras.metrics.Mean(name=f"phi_{k}") for k in ("mean", "std", "min", "max")}
        self.ft_optimizer = None
        self.hyper_optimizer = None
        self._estimator = None
        self.built = True  # every part was required to be built above
        self._host_step = None  # host-side mirror of meta_step for choosing the step function
        self._host_warmup = None
        self._replicas = 1
        self._multi_worker = False

    # ----------------------------------------------------------------- Keras plumbing

    def call(self, inputs, training=False):
        """The downstream model: FT head on encoder features."""
        return self.ft_head(self.encoder(inputs, training=training), training=training)

    @property
    def metrics(self):
        return [self.pt_loss_tracker, self.ft_train_loss_tracker, self.ft_val_loss_tracker,
                self.hypergrad_norm_tracker, self.hypersteps_tracker, self.nonfinite_tracker,
                *self.phi_stats.values()]

    def compile(self, pt_optimizer="adam", ft_optimizer="adam", hyper_optimizer="adam",
                jit_compile="auto", steps_per_execution=1, **kwargs):
        """Sets the PT (``self.optimizer``), FT-head and hyper optimizers."""
        super().compile(optimizer=pt_optimizer, jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution, **kwargs)
        self.ft_optimizer = keras.optimizers.get(ft_optimizer)
        self.hyper_optimizer = keras.optimizers.get(hyper_optimizer)
        self.optimizer.build(self.pt_variables)
        self.ft_optimizer.build(self.ft_head.trainable_variables)
        self.hyper_optimizer.build(self.meta_layer.trainable_variables)
        alpha = self.neumann_alpha
        if alpha is None:
            alpha = _initial_learning_rate(self.optimizer)
        unroll_opt = self.ft_unroll_optimizer or optim.sgd(_initial_learning_rate(self.ft_optimizer))
        self._replicas = self.distribute_strategy.num_replicas_in_sync
        self._multi_worker = distribute.is_multi_worker(self.distribute_strategy)
        if self._replicas > 1 and self.steps_per_execution != 1:
            raise ValueError(
                f"steps_per_execution={self.steps_per_execution} is not supported with "
                f"{self._replicas} replicas (the in-graph step choice would put all-reduces "
                "inside tf.cond); use steps_per_execution=1")
        self._estimator = PTFT(unroll_opt, unroll_steps=self.unroll_steps, solver=self.solver,
                               num_terms=self.neumann_terms, alpha=alpha,
                               max_iterations=self.cg_iterations, check_finite=False,
                               gradient_reduction=distribute.replica_sum if self._replicas > 1
                               else None)

    @property
    def pt_variables(self):
        return self.encoder.trainable_variables + self.pt_head.trainable_variables

    def state_variables(self):
        """(name, variable) for the whole training state: weights (incl. BatchNorm statistics
        and RNG seeds), phi, every optimizer's state, the step counter."""
        named = [(f"model/{v.path}", v) for v in self.variables]
        for label, opt in (("pt_optimizer", self.optimizer), ("ft_optimizer", self.ft_optimizer),
                           ("hyper_optimizer", self.hyper_optimizer)):
            if opt is not None:
                named += [(f"{label}/{i}/{v.path}", v) for i, v in enumerate(opt.variables)]
        seen, unique = set(), []
        for name, v in named:
            if id(v) not in seen:
                seen.add(id(v))
                unique.append((name, v))
        return unique

    def fit(self, x=None, epochs=1, steps_per_epoch=None, callbacks=None, initial_epoch=0,
            **kwargs):
        """`keras.Model.fit` on a `meta_dataset` stream (steps_per_epoch required).

        With a `keras_metapt.callbacks.MetaCheckpoint` among the callbacks, a run resumes from
        its latest checkpoint: the whole state is restored and the stream skips the steps
        already taken, so the resumed run continues exactly where the checkpoint was made.
        """
        if self._estimator is None:
            raise RuntimeError("compile() the MetaPretrainer before fit()")
        if steps_per_epoch is None:
            raise ValueError("MetaPretrainer.fit needs steps_per_epoch (meta_dataset streams are "
                             "infinite)")
        if self.requested_warmup_steps is None:
            self.warmup_steps.assign(int(steps_per_epoch))
        self._host_step = None  # re-read from meta_step (after any restore) at the first step
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if isinstance(cb, MetaCheckpoint):
                restored_epoch = cb.restore(self)
                if restored_epoch is not None:
                    initial_epoch = max(initial_epoch, restored_epoch)
        if initial_epoch and isinstance(x, tf.data.Dataset):
            x = x.skip(int(initial_epoch) * int(steps_per_epoch))
        kwargs.setdefault("shuffle", False)  # streams come from meta_dataset, already ordered
        if not any(isinstance(cb, StopOnNonFiniteHypergradient) for cb in callbacks):
            callbacks.append(StopOnNonFiniteHypergradient())
        return super().fit(x, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                           initial_epoch=initial_epoch, **kwargs)

    # ----------------------------------------------------------------- pure losses

    def _values(self, layer):
        return ([tf.convert_to_tensor(v.value) for v in layer.trainable_variables],
                [tf.convert_to_tensor(v.value) for v in layer.non_trainable_variables])

    def _problem(self, enc_state, head_state, ft_state, meta_state):
        training = self.hyperstep_training

        def features(theta_e, x):
            return self.encoder.stateless_call(theta_e, enc_state, x, training=training)[0]

        def pt_loss(theta_e, theta_h, phi, batch):
            x, y = _split(batch)
            meta_out = None
            if self.meta_role == "inputs":
                x = self.meta_layer.stateless_call(phi, meta_state, x, training=True)[0]
            else:
                meta_out = self.meta_layer.stateless_call(phi, meta_state, x)[0]
            preds = self.pt_head.stateless_call(theta_h, head_state, features(theta_e, x),
                                                training=training)[0]
            return self._replica_share(self.pt_loss_fn(y, preds, meta_out), x)

        def ft_loss(theta_e, psi, batch):
            x, y = _split(batch)
            preds = self.ft_head.stateless_call(psi, ft_state, features(theta_e, x),
                                                training=training)[0]
            return self._replica_share(self.ft_loss_fn(y, preds), x)

        return PretrainFinetuneProblem(pt_loss, ft_loss)

    @staticmethod
    def _replica_share(loss, x):
        """The loss as this replica's share of the global-batch mean (times 1 with one
        replica): summed over replicas it is the mean over the global batch."""
        return loss * distribute.shard_fraction(x, loss.dtype)

    # ----------------------------------------------------------------- steps

    def _pt_step(self, batch):
        x, y = _split(batch)
        with tf.GradientTape() as tape:
            meta_out = None
            if self.meta_role == "inputs":
                x = self.meta_layer(x, training=True)
            else:
                meta_out = self.meta_layer(x)
            preds = self.pt_head(self.encoder(x, training=True), training=True)
            loss = self.pt_loss_fn(y, preds, meta_out)
            share = self._replica_share(loss, x)  # Keras optimizers sum gradients over replicas
        grads = tape.gradient(share, self.pt_variables)
        self.optimizer.apply(grads, self.pt_variables)
        self.pt_loss_tracker.update_state(loss)

    def _ft_head_step(self, meta_train):
        x, y = _split(tf.nest.map_structure(lambda t: t[:, 0], meta_train))
        features = tf.stop_gradient(self.encoder(x, training=self.hyperstep_training))
        with tf.GradientTape() as tape:
            loss = self.ft_loss_fn(y, self.ft_head(features, training=self.hyperstep_training))
            share = self._replica_share(loss, x)
        grads = tape.gradient(share, self.ft_head.trainable_variables)
        self.ft_optimizer.apply(grads, self.ft_head.trainable_variables)
        self.ft_train_loss_tracker.update_state(loss)
        return tf.constant(0, tf.int32)

    def hypergradient(self, data):
        """The PT/FT hypergradient for one data element (a `HypergradResult`); updates nothing."""
        theta_e, enc_state = self._values(self.encoder)
        theta_h, head_state = self._values(self.pt_head)
        psi, ft_state = self._values(self.ft_head)
        phi, meta_state = self._values(self.meta_layer)
        problem = self._problem(enc_state, head_state, ft_state, meta_state)
        return self._estimator(problem, (theta_e, theta_h, psi), phi, data["pt_fresh"],
                               (StepBatches(_swap_first_axes(data["meta_train"])), data["meta_val"]))

    def _hyperstep(self, data):
        result = self.hypergradient(data)
        phi_vars = self.meta_layer.trainable_variables

        def apply():
            self.hyper_optimizer.apply(list(result.hypergrad), phi_vars)
            for var, value in zip(self.ft_head.trainable_variables, result.params[2]):
                var.assign(value)
            return tf.constant(0, tf.int32)

        def skip():  # never a silent update: counted, and fit stops with an error
            return tf.constant(1, tf.int32)

        if self._replicas == 1:
            nonfinite = tf.cond(result.is_finite, apply, skip)
        else:
            nonfinite = self._apply_hypergradient_across_replicas(result)
        # Sum metrics add up over replicas: each replica counts its 1/R share of a hyperstep.
        share = 1.0 / self._replicas
        self.nonfinite_tracker.update_state(tf.cast(nonfinite, tf.float32) * share)
        self.hypersteps_tracker.update_state(share)
        self.ft_val_loss_tracker.update_state(result.outer_loss)
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in result.hypergrad]))
        self.hypergrad_norm_tracker.update_state(tf.where(result.is_finite, norm, 0.0))
        # phi changes only here, so its statistics are taken here (not on every step).
        flat_phi = tf.concat([tf.reshape(v.value, [-1]) for v in phi_vars], 0)
        for key, value in (("mean", tf.reduce_mean(flat_phi)), ("std", tf.math.reduce_std(flat_phi)),
                           ("min", tf.reduce_min(flat_phi)), ("max", tf.reduce_max(flat_phi))):
            self.phi_stats[key].update_state(value)
        return nonfinite

    def _apply_hypergradient_across_replicas(self, result):
        """The hyperstep's update with several replicas.

        The hypergradient and psi_K are already identical on every replica (reduced in the
        estimator), and so is ``is_finite``. Keras optimizers sum gradients over replicas, so
        each replica passes its 1/R share. Optimizer updates may not sit in a tf.cond in a
        replica context, so the finite/non-finite choice is made in the cross-replica context.
        """
        phi_vars = self.meta_layer.trainable_variables
        psi_vars = self.ft_head.trainable_variables
        scale = 1.0 / self._replicas

        def update(grads, psi_k):
            self.hyper_optimizer.apply([g * tf.cast(scale, g.dtype) for g in grads], phi_vars)
            for var, value in zip(psi_vars, psi_k):
                var.assign(value)

        def cross_replica(strategy, grads, psi_k, finite):
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(update, args=(grads, psi_k))
                return tf.constant(0, tf.int32)

            return tf.cond(finite, apply, lambda: tf.constant(1, tf.int32))

        return tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(list(result.hypergrad), list(result.params[2]), result.is_finite))

    @staticmethod
    def _check_element(data):
        if not isinstance(data, dict) or not {"pt", "pt_fresh", "meta_train", "meta_val"} <= set(data):
            raise InputMismatchError(
                "MetaPretrainer expects elements from keras_metapt.meta_dataset(pt, meta_train, "
                f"meta_val, unroll_steps); got {type(data).__name__}")

    def _step_logs(self):
        logs = {m.name: m.result() for m in self.metrics}
        if self._multi_worker:
            # Keras reduces step outputs over workers with reduce(MEAN, axis=0), which needs
            # an axis to reduce: give every log a length-1 one.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _is_hyperstep(self, step, warmup):
        return step >= warmup and (step - warmup) % self.hyperstep_every == 0

    def _regular_train_step(self, data):
        """PT step + FT-head step (a step that is not a hyperstep)."""
        self._check_element(data)
        self._pt_step(data["pt"])
        self._ft_head_step(data["meta_train"])
        self.meta_step.assign_add(1)
        return self._step_logs()

    def _hyper_train_step(self, data):
        """PT step + hyperstep."""
        self._check_element(data)
        self._pt_step(data["pt"])
        self._hyperstep(data)
        self.meta_step.assign_add(1)
        return self._step_logs()

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: every part is built in __init__ and the optimizers in compile().

        (Keras' version averages a first data batch over replicas to trace the model; that
        fails on a dict of batches under MultiWorkerMirroredStrategy and on unequal shards.)
        """
        return

    def make_train_function(self, force=False):
        """Two compiled steps (regular, hyper) chosen on the host for each batch.

        Choosing on the host keeps the hyperstep out of the regular step's graph (no tf.cond
        and no idle branch), and keeps optimizer updates out of control flow. With
        steps_per_execution > 1 several steps run per call, so the choice falls back to a
        tf.cond inside `train_step`.
        """
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            return super().make_train_function(force)
        regular = self._make_function(self._regular_train_step)
        hyper = self._make_function(self._hyper_train_step)

        def train_function(iterator):
            if self._host_step is None:  # synced from the (possibly restored) state variables
                self._host_step = int(self.meta_step.numpy())
                self._host_warmup = int(self.warmup_steps.numpy())
            step = self._host_step
            outputs = (hyper if self._is_hyperstep(step, self._host_warmup) else regular)(iterator)
            self._host_step = step + 1
            return outputs

        self.train_function = train_function
        return train_function

    def train_step(self, data):
        """One step with the choice made in the graph (used when steps_per_execution > 1)."""
        self._check_element(data)
        self._pt_step(data["pt"])
        step = self.meta_step.value
        after_warmup = step >= self.warmup_steps.value
        on_schedule = tf.equal((step - self.warmup_steps.value) % self.hyperstep_every, 0)
        tf.cond(tf.logical_and(after_warmup, on_schedule),
                lambda: self._hyperstep(data), lambda: self._ft_head_step(data["meta_train"]))
        self.meta_step.assign_add(1)
        return self._step_logs()

    def test_step(self, data):
        raise NotImplementedError("evaluate the fine-tuned downstream model instead")

    def meta_parameters(self):
        """phi as NumPy arrays (one per trainable weight of the meta layer)."""
        return [np.array(v.numpy()) for v in self.meta_layer.trainable_variables]
