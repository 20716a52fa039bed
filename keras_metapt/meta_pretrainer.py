"""MetaPretrainer: meta-learning pre-training hyperparameters inside `model.fit()`.

The training loop of Raghu et al. (2021), one PT batch per step:

  1. every step: one PT optimizer step on L_PT(theta_P, phi);
  2. warm-up (default: the first epoch): an FT-head step on detached encoder features of a
     MetaTrain batch;
  3. on the `HyperstepSchedule` (every N steps after warm-up), a hyperstep: the `PTFT`
     hypergradient (K differentiable FT-head steps with the features attached, an inverse-HVP
     solve over the PT Hessian on a fresh PT batch, one mixed VJP; or, with ``online``,
     HyperDistill's online term in place of the solve) and one hyper-optimizer step on phi;
     the FT head takes the K-step value psi_K;
  4. other steps: an FT-head step on detached features of a MetaTrain batch.

Data: one element per step from `meta_dataset(pt, meta_train, meta_val, unroll_steps)`.

The FT unroll of a hyperstep continues from the live FT optimizer by default: a
differentiable twin of the Keras FT optimizer (`optim.mirror_keras`: Adam with its current
moments and step count), as in the official code.

BatchNorm and Dropout: the PT step runs with training=True (it updates BatchNorm statistics);
the FT-head steps and the hyperstep run with ``hyperstep_training`` (default True, as the
official code: batch statistics and dropout in the FT steps, HVPs and the mixed VJP). FT-head
steps, like the PT step, update BatchNorm moving statistics (PyTorch's train mode does the
same) unless ``ft_head_updates_statistics=False``: the encoder's BatchNorm moving statistics
then come from PT batches alone, as in plain PT (the FT-head step applies the encoder
statelessly and keeps every other new non-trainable value, e.g. dropout seeds' states); a
hyperstep never updates BatchNorm statistics or any other non-trainable state (it applies the
models statelessly).

Mixed precision: build the parts under a Keras policy (``keras.mixed_precision.
set_global_policy("mixed_bfloat16")`` or ``"mixed_float16"``). Variables, phi, optimizer states
and hypergradients stay float32; the networks compute in half precision; losses are computed
in float32. With float16 (any part computing in float16) the PT and FT optimizers are wrapped
in Keras' `LossScaleOptimizer` (dynamic loss scaling; a non-finite step is skipped and the
scale halved), and the hyperstep has its own dynamic scale on the MetaVal loss
(``hyper_loss_scale``, see `PretrainFinetuneProblem.outer_loss_scale`): a non-finite
hypergradient is skipped, phi and the FT head are left as they were, the scale is halved and
the skip is counted in ``hyperstep_overflows``; after 200 finite hypersteps in a row the scale
doubles. A non-finite hypergradient at scale 1, or with a non-finite MetaVal loss, counts as
``nonfinite_hypersteps`` (which stops fit). bfloat16 has float32's exponent range and needs no
scaling. ``solve=hypergrad.first_order()`` is refused under a mixed policy: its finite-difference
step (radius / ||v||, about 1e-4 per weight) is below half precision's resolution.
"""

import dataclasses
import re
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_metapt import distribute, functional, linalg, optim
from keras_metapt.callbacks import StopOnNonFiniteHypergradient
from keras_metapt.errors import InputMismatchError
from keras_metapt.hypergrad.implicit import check_hvp_mode, check_solver
from keras_metapt.hypergrad.loss_scale import next_loss_scale
from keras_metapt.hypergrad.problem import StepBatches
from keras_metapt.hypergrad.ptft import (META_ROLES, PTFT, FinetuneBatches, keras_problem,
                                         replica_share, split_xy)

__all__ = ["MetaPretrainer", "HyperstepSchedule", "meta_dataset"]

_ELEMENT_KEYS = ("pt", "pt_fresh", "meta_train", "meta_val")
# finite hypersteps in a row before the hyper loss scale doubles: Keras' LossScaleOptimizer
# waits 2000 steps, and hypersteps come every hyperstep_every (default 10) steps
HYPER_SCALE_GROWTH_HYPERSTEPS = 200
# "_<n>" that Keras appends to default names (gin_3, dense_12_kernel_momentum)
_AUTO_NUMBER = re.compile(r"_\d+(?=_|/|$)")


def meta_dataset(pt, meta_train, meta_val, unroll_steps=1):
    """Zips batched datasets into the element stream `MetaPretrainer.fit` expects.

    Each input is a *batched* `tf.data.Dataset` of (x, y) or x, with a static batch size
    (``batch(n, drop_remainder=True)``); each is repeated forever, so pass ``steps_per_epoch``
    to fit. An element is a dict: "pt" (the PT batch of the step), "pt_fresh" (the PT stream
    one batch ahead: the fresh PT batch of the implicit stage), "meta_train" (``unroll_steps``
    consecutive MetaTrain batches stacked along axis 1, shape [batch, K, ...], so that the
    leading axis stays the example axis that tf.distribute splits across replicas) and
    "meta_val". Deterministic inputs (seeded shuffles) give a deterministic stream, which is
    what exact resumption relies on.
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


@dataclasses.dataclass(frozen=True)
class HyperstepSchedule:
    """Which steps are hypersteps: step >= warmup and (step - warmup) % every == 0.

    ``warmup=None`` means one epoch (resolved by `MetaPretrainer.fit` from steps_per_epoch).
    `is_hyperstep` works on Python ints (the host-side choice of the compiled step) and on
    tensors (the in-graph choice under steps_per_execution > 1), with the same expression.
    """

    every: int = 10
    warmup: Optional[int] = None

    def __post_init__(self):
        if int(self.every) < 1:
            raise ValueError(f"hyperstep_every must be >= 1, got {self.every}")
        if self.warmup is not None and int(self.warmup) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup}")

    def is_hyperstep(self, step, warmup):
        return (step >= warmup) & ((step - warmup) % self.every == 0)


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
      solve: the PT-stage inverse-HVP solver, a `keras_metapt.linalg` solver; default
        ``linalg.neumann(1)`` with alpha = the PT optimizer's learning rate *at each
        hyperstep* (it follows a schedule). ``hypergrad.first_order(radius)``: SAMA's
        first-order hyperstep instead (no HVP, no mixed VJP: the PT optimizer's update
        Jacobian for H^-1, a finite-difference mixed product; 1 PT gradient + 2 gradients
        with respect to phi).
      hvp_mode: how the solver's HVPs are computed: "reverse_over_reverse" (default) or
        "forward_over_reverse" (`linalg.hvp`; no second backward pass).
      warmup_steps: FT-head-only steps before the first hyperstep; default the first epoch.
      ft_unroll_optimizer: differentiable `optim.InnerOptimizer` for the FT unroll, started
        from a fresh state every hyperstep; default None: the twin of the Keras FT optimizer
        continuing from its live state (`optim.mirror_keras`; Keras SGD or Adam/AdamW).
      ft_head_updates_statistics: whether the FT-head steps on MetaTrain batches update the
        encoder's moving statistics (BatchNorm), as PyTorch's train mode does (default True,
        the official code). False keeps them those of the PT batches, as plain PT leaves
        them; the features still use batch statistics with ``hyperstep_training``.
      hyperstep_training: the training flag of encoder and heads in FT-head steps and
        hypersteps (BatchNorm/Dropout mode); default True (as the official code).
      curvature_iterations: if > 0, every hyperstep also estimates lambda_max of the PT
        Hessian on the fresh PT batch by that many power iterations and logs it as
        ``pt_lambda_max`` (Neumann needs alpha * lambda_max < 2); costs that many + 1 HVPs.
      hyper_loss_scale: the initial dynamic loss scale of the hyperstep when a part computes
        in float16 (default 2^15, Keras' initial scale); ignored otherwise.
      online: None (the PT stage is implicit, by ``solve``), or a `keras_metapt.HyperDistill`
        whose (stateless) optimizer models the PT step, e.g. ``optim.sgd(pt_lr)``: the PT
        stage of every hyperstep is then its online term over the PT run since `compile`
        (`PTFT`'s ``online``; one step VJP in place of the solver's HVPs, plus a reference
        every ``distill_every`` PT steps). The first `compile` (meta_step 0) starts it at
        the current PT weights; every PT step counts; its state is part of
        `state_variables` (resumes with `MetaCheckpoint`). ``solve`` and ``hvp_mode`` must
        then be left at their defaults. One replica, float32 parts.

    Cost per hyperstep: K FT-head gradients through the encoder + 1 backward, the solver's
    HVPs of the PT loss, 1 mixed VJP (with ``online``: 1 step VJP, plus a reference's step
    VJPs every ``distill_every`` PT steps). Memory: O(P + K * P_psi), as `PTFT` (``online``
    keeps one more copy of theta_P).
    """

    def __init__(self, encoder, pt_head, ft_head, meta_layer, pt_loss, ft_loss, meta_role="loss",
                 hyperstep_every=10, unroll_steps=1, solve=None,
                 hvp_mode="reverse_over_reverse", warmup_steps=None,
                 ft_unroll_optimizer=None, hyperstep_training=True, curvature_iterations=0,
                 hyper_loss_scale=2.0 ** 15, online=None, ft_head_updates_statistics=True,
                 **kwargs):
        super().__init__(**kwargs)
        if meta_role not in META_ROLES:
            raise ValueError(f"meta_role must be one of {META_ROLES}, got {meta_role!r}")
        for name, part in (("encoder", encoder), ("pt_head", pt_head), ("ft_head", ft_head),
                           ("meta_layer", meta_layer)):
            if not part.built:
                raise InputMismatchError(
                    f"{name} {part.name!r} is not built: build it (call it on example inputs or "
                    "give it a keras.Input) before creating the MetaPretrainer")
        if not meta_layer.trainable_variables:
            raise InputMismatchError(f"meta_layer {meta_layer.name!r} has no trainable weights "
                                     "(nothing to meta-learn)")
        self.encoder, self.pt_head, self.ft_head, self.meta_layer = (encoder, pt_head, ft_head,
                                                                     meta_layer)
        self.pt_loss_fn, self.ft_loss_fn, self.meta_role = pt_loss, ft_loss, meta_role
        self.schedule = HyperstepSchedule(int(hyperstep_every), warmup_steps)
        self.unroll_steps = int(unroll_steps)
        if online is not None and (solve is not None or hvp_mode != "reverse_over_reverse"):
            raise ValueError("online=HyperDistill(...) replaces the PT stage's solve: leave "
                             f"solve and hvp_mode at their defaults (got solve={solve!r}, "
                             f"hvp_mode={hvp_mode!r})")
        self.solve = check_solver(linalg.neumann(1) if solve is None else solve)
        self.hvp_mode = check_hvp_mode(hvp_mode)
        self.ft_unroll_optimizer = ft_unroll_optimizer
        self.hyperstep_training = bool(hyperstep_training)
        self.ft_head_updates_statistics = bool(ft_head_updates_statistics)
        self._batchnorm_statistics = {  # ids of the encoder's BatchNorm moving statistics
            id(v) for layer in encoder._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)
            for v in layer.non_trainable_variables}
        self.curvature_iterations = int(curvature_iterations)
        self.meta_step = keras.Variable(0, dtype="int64", trainable=False, name="meta_step")
        self.warmup_steps = keras.Variable(warmup_steps or 0, dtype="int64", trainable=False,
                                           name="warmup_steps")
        names = ("pt_loss", "ft_train_loss", "ft_val_loss", "hypergrad_norm", "hypersteps",
                 "nonfinite_hypersteps", "phi_mean", "phi_std", "phi_min", "phi_max")
        names += ("pt_lambda_max",) if self.curvature_iterations > 0 else ()
        parts = (encoder, pt_head, ft_head, meta_layer)
        self.float16 = any(part.compute_dtype == "float16" for part in parts)
        half = [p.name for p in parts if p.compute_dtype in functional.HALF_PRECISION]
        if half and hasattr(self.solve, "indirect_term"):
            raise ValueError(
                f"solve={self.solve!r} needs float32 parts: {', '.join(half)} compute in half "
                "precision, below the resolution of its finite-difference step (radius / "
                "||v||, about 1e-4 per weight). Use linalg.neumann(...) or linalg.cg(...)")
        if online is not None:
            if not hasattr(online, "distilled_term"):
                raise TypeError(f"online must be None or a keras_metapt.HyperDistill, got "
                                f"{online!r}")
            if half:
                raise ValueError(f"online=HyperDistill(...) needs float32 parts: "
                                 f"{', '.join(half)} compute in half precision")
        self.online = online
        if self.float16:
            if not float(hyper_loss_scale) >= 1.0:
                raise ValueError(f"hyper_loss_scale must be >= 1, got {hyper_loss_scale}")
            self.hyper_loss_scale = keras.Variable(float(hyper_loss_scale), dtype="float32",
                                                   trainable=False, name="hyper_loss_scale")
            self.finite_hypersteps_in_a_row = keras.Variable(
                0, dtype="int64", trainable=False, name="finite_hypersteps_in_a_row")
            names += ("hyperstep_overflows", "hyper_loss_scale", "pt_loss_scale",
                      "ft_loss_scale")
        self.trackers = {n: (keras.metrics.Sum if n.startswith(("hypersteps", "nonfinite_",
                                                                 "hyperstep_overflows"))
                             else keras.metrics.Mean)(name=n)
                         for n in names}
        self.ft_optimizer = self.hyper_optimizer = self._reduction = None
        self._compiled = False
        self.built = True  # every part was required to be built above
        self._host_step = None  # host-side mirror of meta_step for choosing the step function
        self._stream_skip = 0  # elements to discard before the next step (set on resume)

    def call(self, inputs, training=False):
        """The downstream model: FT head on encoder features."""
        return self.ft_head(self.encoder(inputs, training=training), training=training)

    @property
    def metrics(self):
        return list(self.trackers.values())

    @property
    def pt_variables(self):
        return self.encoder.trainable_variables + self.pt_head.trainable_variables

    def compile(self, pt_optimizer="adam", ft_optimizer="adam", hyper_optimizer="adam",
                jit_compile="auto", steps_per_execution=1, **kwargs):
        """Sets the PT (``self.optimizer``), FT-head and hyper optimizers.

        ``hyper_optimizer``: one optimizer for every phi variable, or parameter groups, a list
        of ``(optimizer, variables)`` pairs that together hold each trainable variable of the
        meta layer exactly once (e.g. a slow rate for a per-example network and a fast one
        for a global strength). ``self.hyper_optimizer`` is then a list of the optimizers
        (with two or more groups; one group is the plain optimizer, as before).
        """
        kwargs.setdefault("auto_scale_loss", False)  # float16: wrapped below, both optimizers
        super().compile(optimizer=pt_optimizer, jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution, **kwargs)
        self.ft_optimizer = keras.optimizers.get(ft_optimizer)
        if self.float16:
            self.optimizer = _loss_scaled(self.optimizer, "pt")
            self.ft_optimizer = _loss_scaled(self.ft_optimizer, "ft")
        self._hyper_groups = self._parameter_groups(hyper_optimizer)
        self.hyper_optimizer = (self._hyper_groups[0][0] if len(self._hyper_groups) == 1
                                else [opt for opt, _ in self._hyper_groups])
        self.optimizer.build(self.pt_variables)
        self.ft_optimizer.build(self.ft_head.trainable_variables)
        for opt, positions in self._hyper_groups:
            opt.build([self.meta_layer.trainable_variables[i] for i in positions])
        if self.ft_unroll_optimizer is None:
            try:
                optim.mirror_keras(self.ft_optimizer, self.ft_head.trainable_variables)
            except ValueError as error:
                raise ValueError(f"{error}. Pass MetaPretrainer(ft_unroll_optimizer="
                                 "km.optim.sgd(...)) or use a Keras SGD/Adam FT optimizer") from None
        if hasattr(self.solve, "with_optimizer"):
            try:
                self._pt_optimizer_twin()
            except ValueError as error:
                raise ValueError(f"{error}. solve=first_order() preconditions with the PT "
                                 "optimizer: use a Keras SGD/Adam PT optimizer") from None
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1 and self.steps_per_execution != 1:
            raise ValueError(
                f"steps_per_execution={self.steps_per_execution} is not supported with "
                f"{replicas} replicas (the in-graph step choice would put all-reduces "
                "inside tf.cond); use steps_per_execution=1")
        self._multi_worker = distribute.is_multi_worker(self.distribute_strategy)
        self._reduction = distribute.replica_sum if replicas > 1 else None
        if self.online is not None:
            if replicas > 1:
                raise ValueError(f"online=HyperDistill(...) runs on one replica, not "
                                 f"{replicas}: use the implicit PT stage (solve=...)")
            if self.online.state is None or int(self.meta_step.numpy()) == 0:
                # the run's start; a compile later in the run keeps the online state
                self.online.start(([v.value for v in self.encoder.trainable_variables],
                                   [v.value for v in self.pt_head.trainable_variables]))
        self._compiled = True

    def _parameter_groups(self, hyper_optimizer):
        """[(optimizer, positions of its variables in meta_layer.trainable_variables)]."""
        phi = self.meta_layer.trainable_variables
        if not isinstance(hyper_optimizer, (list, tuple)):
            return [(keras.optimizers.get(hyper_optimizer), list(range(len(phi))))]
        where = {id(v): i for i, v in enumerate(phi)}
        groups, owner = [], {}
        for k, group in enumerate(hyper_optimizer):
            if not (isinstance(group, (list, tuple)) and len(group) == 2):
                raise ValueError(f"hyper_optimizer[{k}] must be an (optimizer, variables) pair, "
                                 f"got {group!r}")
            opt, variables = group
            if any(opt is other for other, _ in groups):
                raise ValueError(f"hyper_optimizer[{k}] repeats an optimizer of an earlier group: "
                                 "give each group its own optimizer object")
            positions = []
            for v in variables:
                if id(v) not in where:
                    raise ValueError(f"hyper_optimizer[{k}]: {v.path} is not a trainable "
                                     f"variable of the meta layer {self.meta_layer.name}")
                if id(v) in owner:
                    raise ValueError(f"{v.path} is in hyper_optimizer[{owner[id(v)]}] and "
                                     f"hyper_optimizer[{k}]: give each phi variable one group")
                owner[id(v)] = k
                positions.append(where[id(v)])
            groups.append((keras.optimizers.get(opt), positions))
        missing = [v.path for v in phi if id(v) not in owner]
        if missing:
            raise ValueError(f"hyper_optimizer groups leave out phi variables {missing}: give "
                             "each one a group")
        return groups

    def state_variables(self):
        """(key, variable) for the whole training state: weights (incl. BatchNorm statistics
        and RNG seeds), phi, every optimizer's state, the step counter.

        Keys are stable across processes that build the same model in another order or after
        other models: ``<group>/<position>/<path without Keras' auto-numbering>``, e.g.
        ``model/0003/gin/self_loop/kernel`` for ``gin_3/self_loop_0/kernel``. Keras numbers
        default layer names per process (``gin``, ``gin_1``, ...), so raw paths change when a
        resumed process builds fewer models first; position and shape identify a variable."""
        groups = [("model", self.variables)]
        optimizers = [("pt_optimizer", self.optimizer), ("ft_optimizer", self.ft_optimizer)]
        if isinstance(self.hyper_optimizer, list):  # parameter groups: one key prefix each
            optimizers += [(f"hyper_optimizer_{k}", opt)
                           for k, opt in enumerate(self.hyper_optimizer)]
        else:
            optimizers.append(("hyper_optimizer", self.hyper_optimizer))
        for label, opt in optimizers:
            if opt is not None:
                groups.append((label, opt.variables))
        if self.online is not None and self.online.state is not None:
            groups.append(("online", [_TFVariableState(v)
                                      for v in self.online.state.variables]))
        seen, named = set(), []
        for label, variables in groups:
            position = 0
            for v in variables:
                if id(v) in seen:
                    continue
                seen.add(id(v))
                named.append((f"{label}/{position:04d}/{_AUTO_NUMBER.sub('', v.path)}", v))
                position += 1
        return named

    def resume_stream_at(self, steps):
        """Discard ``steps`` stream elements before the next step (called by `MetaCheckpoint`
        after a restore, so the stream continues where the checkpointed run stopped)."""
        self._stream_skip = int(steps)

    def fit(self, x=None, epochs=1, steps_per_epoch=None, callbacks=None, **kwargs):
        """`keras.Model.fit` on a `meta_dataset` stream (steps_per_epoch required).

        A `keras_metapt.callbacks.MetaCheckpoint` among the callbacks resumes the run from its
        latest checkpoint (whole state, and the stream at the same element). Adds a
        `StopOnNonFiniteHypergradient` unless one is given.
        """
        if not self._compiled:
            raise RuntimeError("compile() the MetaPretrainer before fit()")
        if steps_per_epoch is None:
            raise ValueError("MetaPretrainer.fit needs steps_per_epoch (meta_dataset streams are "
                             "infinite)")
        if self.schedule.warmup is None:
            self.warmup_steps.assign(int(steps_per_epoch))
        self._host_step = None  # re-read from meta_step (after any restore) at the first step
        callbacks = list(callbacks or [])
        if not any(isinstance(cb, StopOnNonFiniteHypergradient) for cb in callbacks):
            callbacks.append(StopOnNonFiniteHypergradient())
        kwargs.setdefault("shuffle", False)  # streams come from meta_dataset, already ordered
        return super().fit(x, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                           **kwargs)

    # ----------------------------------------------------------------- steps

    def _pt_step(self, batch):
        x, y = split_xy(batch)
        with tf.GradientTape() as tape:
            meta_out = None
            if self.meta_role == "inputs":
                x = self.meta_layer(x, training=True)
            else:
                meta_out = self.meta_layer(x)
            preds = self.pt_head(self.encoder(x, training=True), training=True)
            loss = self.pt_loss_fn(y, functional.full_precision(preds),
                                   functional.full_precision(meta_out))
            share = replica_share(loss, x)  # Keras optimizers sum gradients over replicas
            share = self.optimizer.scale_loss(share)  # float16: times the dynamic scale
        grads = self._finite_on_every_replica(tape.gradient(share, self.pt_variables))
        self.optimizer.apply(grads, self.pt_variables)
        self.trackers["pt_loss"].update_state(loss)
        if self.float16:
            self.trackers["pt_loss_scale"].update_state(self.optimizer.dynamic_scale)

    def _ft_head_step(self, meta_train):
        x, y = split_xy(tf.nest.map_structure(lambda t: t[:, 0], meta_train))
        if self.ft_head_updates_statistics:
            features = self.encoder(x, training=self.hyperstep_training)
        else:  # every new non-trainable value but BatchNorm's moving statistics is kept
            state = self.encoder.non_trainable_variables
            features, new_state = functional.stateless_call(
                self.encoder, [v.value for v in self.encoder.trainable_variables],
                [v.value for v in state], x, self.hyperstep_training)
            for var, value in zip(state, new_state):
                if id(var) not in self._batchnorm_statistics:  # e.g. a dropout seed's state
                    var.assign(value)
        features = tf.stop_gradient(features)
        variables = self.ft_head.trainable_variables
        with tf.GradientTape() as tape:
            preds = self.ft_head(features, training=self.hyperstep_training)
            loss = self.ft_loss_fn(y, functional.full_precision(preds))
            share = self.ft_optimizer.scale_loss(replica_share(loss, x))
        self.ft_optimizer.apply(self._finite_on_every_replica(tape.gradient(share, variables)),
                                variables)
        self.trackers["ft_train_loss"].update_state(loss)
        if self.float16:
            self.trackers["ft_loss_scale"].update_state(self.ft_optimizer.dynamic_scale)
        return tf.constant(0, tf.int32)

    def _finite_on_every_replica(self, grads):
        """float16 on several replicas: the gradients made NaN on every replica unless they
        are finite on all of them. Keras' LossScaleOptimizer decides to skip a step from the
        first replica's gradients alone (it expects them all-reduced already), so an overflow
        on another replica would reach the weights. One all-reduce of a flag per step."""
        if not self.float16 or self._reduction is None:
            return grads
        values = [g.values if isinstance(g, tf.IndexedSlices) else g
                  for g in grads if g is not None]
        bad = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                          for v in values]), tf.float32)
        finite = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                                bad) == 0.0

        def poison(g):
            if g is None:
                return None
            nan = tf.where(finite, tf.constant(0.0, g.dtype), tf.constant(float("nan"), g.dtype))
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values + nan, g.indices, g.dense_shape)
            return g + nan
        return [poison(g) for g in grads]

    def hypergradient(self, data, _count_online_step=False):
        """The PT/FT hypergradient for one data element (a `HypergradResult`); updates nothing
        (with ``online``: the term at its current state, without a reference, an anchor move
        or a counted step; hypersteps count). A Neumann solver without alpha uses the PT
        optimizer's current learning rate."""
        problem, params, phi = keras_problem(
            self.encoder, self.pt_head, self.ft_head, self.meta_layer, self.pt_loss_fn,
            self.ft_loss_fn, self.meta_role, self.hyperstep_training,
            pt_learning_rate=self.optimizer.learning_rate,
            outer_loss_scale=self.hyper_loss_scale.value if self.float16 else None)
        batches = FinetuneBatches(StepBatches(_swap_first_axes(data["meta_train"])),
                                  data["meta_val"])
        if self.ft_unroll_optimizer is None:  # the live FT optimizer's twin and state
            unroll_opt, state = optim.mirror_keras(self.ft_optimizer,
                                                   self.ft_head.trainable_variables)
        else:
            unroll_opt, state = self.ft_unroll_optimizer, None
        solve = self.solve
        if self.online is None and hasattr(solve, "with_optimizer"):
            # first order: P = the live PT optimizer's Jacobian
            solve = solve.with_optimizer(*self._pt_optimizer_twin())
        estimator = PTFT(unroll_opt, self.unroll_steps, solve, self.hvp_mode,
                         check_finite=False,
                         gradient_reduction=self._reduction, online=self.online,
                         update_online=_count_online_step)
        return estimator(problem, params, phi, data["pt_fresh"], batches, opt_state=state)

    def _pt_optimizer_twin(self):
        """The PT optimizer's differentiable twin and live state, the state split like the
        (encoder, PT head) parameters of `keras_problem`."""
        twin, state = optim.mirror_keras(self.optimizer, self.pt_variables)
        n = len(self.encoder.trainable_variables)

        def split(part):
            return (part[:n], part[n:]) if isinstance(part, list) else part
        return twin, (tuple(split(p) for p in state) if isinstance(state, tuple)
                      else split(state))

    def pt_curvature(self, data, num_iterations=20):
        """lambda_max of the PT Hessian (over encoder and PT head) on ``data["pt_fresh"]``, by
        power iteration (`linalg.max_eigenvalue`); the start is seeded by the step."""
        problem, params, phi = keras_problem(
            self.encoder, self.pt_head, self.ft_head, self.meta_layer, self.pt_loss_fn,
            self.ft_loss_fn, self.meta_role, self.hyperstep_training)
        theta_p = (params.encoder, params.pt_head)

        def hvp_fn(v):
            h_v = linalg.hvp(lambda tp: problem.pt_loss(tp[0], tp[1], phi, data["pt_fresh"]),
                             theta_p, v, self.hvp_mode)
            return h_v if self._reduction is None else self._reduction(h_v)

        seed = tf.stack([tf.constant(0, tf.int64), tf.cast(self.meta_step.value, tf.int64)])
        return linalg.max_eigenvalue(hvp_fn, theta_p, num_iterations, seed,
                                     unroll=self._reduction is not None)

    def _hyperstep(self, data):
        result = self.hypergradient(data, _count_online_step=True)
        phi_vars, psi_vars = self.meta_layer.trainable_variables, self.ft_head.trainable_variables
        replicas = self.distribute_strategy.num_replicas_in_sync

        def update(grads, psi_k):  # Keras optimizers sum over replicas: each passes 1/R
            grads = [g * tf.cast(1.0 / replicas, g.dtype) for g in grads]
            for opt, positions in self._hyper_groups:
                opt.apply([grads[i] for i in positions], [phi_vars[i] for i in positions])
            for var, value in zip(psi_vars, psi_k):
                var.assign(value)

        # Never a silent update: a non-finite hypergradient is skipped, counted, and
        # StopOnNonFiniteHypergradient stops fit with an error.
        nonfinite = distribute.run_if_finite(
            update, (list(result.hypergrad), list(result.params.ft_head)), result.is_finite)
        share = 1.0 / replicas  # Sum metrics add up over replicas: 1/R of a hyperstep each
        nonfinite = tf.cast(nonfinite, tf.float32)
        if self.float16:
            overflow = tf.cast(self._update_hyper_loss_scale(result.is_finite,
                                                             result.outer_loss), tf.float32)
            self.trackers["hyperstep_overflows"].update_state(overflow * share)
            nonfinite = nonfinite - overflow  # an overflow at a scale > 1 is not an error
        self.trackers["nonfinite_hypersteps"].update_state(nonfinite * share)
        self.trackers["hypersteps"].update_state(share)
        self.trackers["ft_val_loss"].update_state(result.outer_loss)
        if self.curvature_iterations > 0:
            self.trackers["pt_lambda_max"].update_state(
                self.pt_curvature(data, self.curvature_iterations))
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in result.hypergrad]))
        self.trackers["hypergrad_norm"].update_state(tf.where(result.is_finite, norm, 0.0))
        flat_phi = tf.concat([tf.reshape(v.value, [-1]) for v in phi_vars], 0)
        for key, reduce in (("mean", tf.reduce_mean), ("std", tf.math.reduce_std),
                            ("min", tf.reduce_min), ("max", tf.reduce_max)):
            self.trackers[f"phi_{key}"].update_state(reduce(flat_phi))
        return tf.cast(nonfinite, tf.int32)  # as _ft_head_step's 0, for the in-graph tf.cond

    def _update_hyper_loss_scale(self, is_finite, outer_loss):
        """Dynamic loss scaling of the hyperstep (float16): halve the scale (not below 1) after
        a non-finite hypergradient, double it after HYPER_SCALE_GROWTH_HYPERSTEPS finite ones
        in a row. Returns whether this hyperstep was an overflow: a non-finite hypergradient
        at a scale above 1 with a finite (unscaled) MetaVal loss. A NaN/Inf MetaVal loss is an
        error at any scale (counted in nonfinite_hypersteps, which stops fit)."""
        scale = self.hyper_loss_scale.value
        new_scale, in_a_row = next_loss_scale(
            scale, is_finite, self.finite_hypersteps_in_a_row.value,
            HYPER_SCALE_GROWTH_HYPERSTEPS)
        self.hyper_loss_scale.assign(new_scale)
        self.finite_hypersteps_in_a_row.assign(in_a_row)
        self.trackers["hyper_loss_scale"].update_state(self.hyper_loss_scale.value)
        return ~is_finite & (scale > 1.0) & tf.math.is_finite(outer_loss)

    def _train_step(self, data, hyper):
        """PT step, then a hyperstep or an FT-head step; ``hyper`` is a Python bool (chosen on
        the host) or None (chosen in the graph, by the same `HyperstepSchedule`)."""
        if not isinstance(data, dict) or not set(_ELEMENT_KEYS) <= set(data):
            raise InputMismatchError(
                "MetaPretrainer expects elements from keras_metapt.meta_dataset(pt, meta_train, "
                f"meta_val, unroll_steps); got {type(data).__name__}")
        self._pt_step(data["pt"])
        if hyper is None:
            tf.cond(self.schedule.is_hyperstep(self.meta_step.value, self.warmup_steps.value),
                    lambda: self._hyperstep(data), lambda: self._regular_tail(data))
        elif hyper:
            self._hyperstep(data)  # with online: its PT stage counts this PT step
        else:
            self._regular_tail(data)
        self.meta_step.assign_add(1)
        logs = {m.name: m.result() for m in self.metrics}
        if self._multi_worker:
            # Keras reduces step outputs over workers with reduce(MEAN, axis=0): give an axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _regular_tail(self, data):
        """After a regular step's PT step: the FT-head step; the PT step counted by online."""
        if self.online is not None:
            self.online.advance(1)
        return self._ft_head_step(data["meta_train"])

    def _regular_train_step(self, data):
        return self._train_step(data, hyper=False)

    def _hyper_train_step(self, data):
        return self._train_step(data, hyper=True)

    def train_step(self, data):
        """One step with the choice made in the graph (used when steps_per_execution > 1)."""
        return self._train_step(data, hyper=None)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Private Keras override (tested in test_keras_overrides): every part is built in
        __init__; Keras' version traces a replica-averaged batch, which fails on a dict of
        batches under MultiWorkerMirroredStrategy and on unequal shards."""
        return

    def make_train_function(self, force=False):
        """Two compiled steps (regular, hyper) chosen on the host for each batch, so the
        hyperstep stays out of the regular step's graph and optimizer updates out of control
        flow. With steps_per_execution > 1, Keras' function with `train_step` (in-graph choice).
        Either way, a pending `resume_stream_at` skip is taken before the first step."""
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            super().make_train_function(force)  # sets self.train_function
            step_fn = self.train_function
        else:  # `_make_function` is private Keras (tested in test_keras_overrides)
            regular = self._make_function(self._regular_train_step)
            hyper = self._make_function(self._hyper_train_step)

            def step_fn(iterator):
                if self._host_step is None:  # synced from the (possibly restored) state
                    self._host_step = int(self.meta_step.numpy())
                step, warmup = self._host_step, int(self.warmup_steps.numpy())
                self._host_step = step + 1
                return (hyper if self.schedule.is_hyperstep(step, warmup) else regular)(iterator)

        def train_function(iterator):
            while self._stream_skip > 0:
                next(iterator)
                self._stream_skip -= 1
            return step_fn(iterator)

        self.train_function = train_function
        return train_function

    def test_step(self, data):
        raise NotImplementedError("evaluate the fine-tuned downstream model instead")

    def meta_parameters(self):
        """phi as NumPy arrays (one per trainable weight of the meta layer)."""
        return [np.array(v.numpy()) for v in self.meta_layer.trainable_variables]


class _TFVariableState:
    """A tf.Variable (HyperDistill's state) seen as `MetaCheckpoint` sees Keras variables:
    path, shape, value, assign."""

    def __init__(self, variable):
        self.variable = variable

    @property
    def path(self):
        return self.variable.name.split(":")[0]

    @property
    def shape(self):
        return self.variable.shape

    @property
    def value(self):
        return self.variable.numpy()

    @property
    def dtype(self):
        return self.variable.dtype

    def numpy(self):
        return self.variable.numpy()

    def assign(self, value):
        self.variable.assign(value)


def _loss_scaled(optimizer, label):
    """``optimizer`` wrapped in Keras' dynamic `LossScaleOptimizer` (unless it already is)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    return keras.optimizers.LossScaleOptimizer(optimizer, name=f"{label}_loss_scale_optimizer")
