"""The PT/FT hypergradient of "Meta-learning to Improve Pre-training" (Raghu et al. 2021).

Parameters: theta_P = (theta_E encoder, theta_H PT head), psi = FT head, phi = meta-parameters.
Objective: min_phi L_FT_val(FT(theta_P*(phi))), theta_P*(phi) = argmin L_PT(theta_P, phi).

One hypergradient:
  a. FT stage, unrolled: psi_0 = psi; K differentiable optimizer steps
       psi_{k+1} = U(psi_k, grad_psi L_FT(theta_E, psi_k; MetaTrain_k))
     with the encoder features attached, then
       g_FT = d L_FT(theta_E, psi_K; MetaVal) / d theta_E         (through the K steps)
  b. PT stage, implicit: v ~ H^-1 [g_FT; 0], H = d2 L_PT / d theta_P2 on a fresh PT batch
     (a `keras_metapt.linalg` solver: Neumann alpha sum_{j<=i} (I - alpha H)^j, CG, dense), and
       hypergradient = - d <d L_PT(theta_P, phi) / d theta_P, v> / d phi     (no direct term)

The psi blocks of the Hessian and of d L_PT/d[theta_P, psi] are zero (L_PT does not depend on
psi), so the solve runs over theta_P only; this is the same quantity as the formula over
[theta_P, psi].

Cost: K FT gradients + 1 backward through them (second order in theta_E), plus i HVPs of L_PT
(or CG iterations) and 1 mixed VJP. Memory: O(P + K * P_psi) (the K unrolled FT-head steps
keep K copies of psi and their activations; theta_E and theta_H are held once).

`keras_problem` builds the problem, params and phi from Keras parts (encoder, heads, the meta
layer) for `MetaPretrainer`, or for a loop of your own.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import tensorflow as tf

from keras_metapt import _tree, distribute, functional, linalg
from keras_metapt.errors import InputMismatchError
from keras_metapt.hypergrad import problem as _p
from keras_metapt.hypergrad.implicit import check_hvp_mode, check_solver, implicit_indirect_term

__all__ = ["PretrainFinetuneProblem", "PTFTParams", "FinetuneBatches", "PTFT", "keras_problem",
           "META_ROLES"]

META_ROLES = ("loss", "inputs")


@dataclasses.dataclass(frozen=True)
class PretrainFinetuneProblem:
    """Pure losses of the two stages.

    pt_loss(theta_E, theta_H, phi, batch) -> scalar   (pre-training loss, shaped by phi)
    ft_loss(theta_E, psi, batch) -> scalar             (fine-tuning loss of the FT head)
    pt_learning_rate: the PT optimizer's step size now (a float or scalar tensor), handed to
      the solver (`linalg.neumann(alpha=None)` uses it as alpha); None if unknown.
    outer_loss_scale: S (a float or scalar tensor), None for 1: loss scaling for float16.
      The MetaVal loss is multiplied by S before the backward passes and the result divided
      by S. The hypergradient is linear in the MetaVal gradient (the unroll's backward, the
      solver and the mixed VJP are linear in it; CG and first_order are homogeneous), so
      the value is unchanged up to rounding, while every cotangent of the unroll's backward
      and every second-order product of the solver and the mixed VJP is S times larger in
      half precision, away from float16's underflow. A too-large S overflows to Inf: the
      result is then not finite (``is_finite`` False) and the caller lowers S.
    """

    pt_loss: Callable[[Any, Any, Any, Any], tf.Tensor]
    ft_loss: Callable[[Any, Any, Any], tf.Tensor]
    pt_learning_rate: Any = None
    outer_loss_scale: Any = None


class PTFTParams(NamedTuple):
    """The ``params`` of a PT/FT problem: which parameters are PT (encoder, PT head) and FT."""

    encoder: Any   # theta_E: pre-trained, then fine-tuned
    pt_head: Any   # theta_H: pre-training only
    ft_head: Any   # psi: the FT head, unrolled K steps per hypergradient


class FinetuneBatches(NamedTuple):
    """The ``outer_batch`` of a PT/FT problem."""

    train: Any     # MetaTrain: one batch for every FT step, or StepBatches with K batches
    val: Any       # MetaVal: the batch of the outer (FT validation) loss


def _identity(tree):
    return tree


class PTFT(_p.Estimator):
    """PT/FT hypergradient estimator (implicit over PT, unrolled over K FT-head steps).

    Called as every estimator: ``PTFT(...)(problem, PTFTParams(theta_E, theta_H, psi), phi,
    pt_batch, FinetuneBatches(meta_train, meta_val), opt_state=None)`` (plain tuples work
    too). Returns a `HypergradResult` whose ``params`` are (theta_E, theta_H, psi_K),
    ``opt_state`` the FT optimizer state after the K steps, and ``outer_loss`` the MetaVal
    loss at psi_K. There is no direct term (L_FT does not depend on phi).

    Args:
      ft_optimizer: differentiable `InnerOptimizer` for the FT unroll.
      unroll_steps: K >= 1.
      solve: a `keras_metapt.linalg` solver for the PT stage; default ``linalg.neumann(1)``
        (Raghu et al.: one Neumann term, alpha = the PT learning rate, read from
        ``problem.pt_learning_rate``).
      hvp_mode: "reverse_over_reverse" (default) or "forward_over_reverse" (`linalg.hvp`).
      gradient_reduction: None (one device) or a nest -> nest sum over replicas
        (`keras_metapt.distribute.replica_sum`). With it, the losses must be the replica's
        share of the global-batch mean (`distribute.shard_fraction`); every FT gradient, g_FT,
        HVP and the mixed VJP is reduced, so the result equals the single-device one on the
        global batches, on every replica; the loops are then traced in Python.
      check_finite: see `Estimator` (MetaPretrainer passes False, skips a non-finite update
        itself, then stops fit with that error). ``seed`` is accepted and ignored.
      online: None (the PT stage is implicit, by ``solve``), or a started
        `keras_metapt.HyperDistill` whose optimizer models the PT step (e.g.
        ``optim.sgd(pt_learning_rate)``): the PT stage is then its online term over the PT
        run so far, pi_t d <Phi(theta_hat_t, phi), [g_FT; 0]> / d phi with Phi the PT step
        and theta_hat_t on the line from the run's start to theta_P (`HyperDistill.
        distilled_term`; one step VJP, plus its periodic references). Each call counts one
        PT step; the caller counts the PT steps between calls with its ``advance``. theta_P
        stands for both w_(t-1) and w_t (the caller has taken its PT step), so the step
        modelled at gamma 0 is the one on ``pt_batch`` from theta_P. With SGD at rate alpha,
        gamma 0 and no references this is the one-step term -alpha d <grad L_PT, [g_FT; 0]> /
        d phi, i.e. the Neumann series with no HVP term (``linalg.neumann(0, alpha)``). The
        optimizer's state starts fresh at every call: use a stateless one such as
        ``optim.sgd``. ``solve`` and ``hvp_mode`` are then unused. One replica only.
    """

    def __init__(self, ft_optimizer, unroll_steps=1, solve=linalg.neumann(1),
                 hvp_mode="reverse_over_reverse", *, gradient_reduction=None, check_finite=True,
                 online=None, update_online=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        if int(unroll_steps) < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        self.ft_optimizer = ft_optimizer
        self.unroll_steps = int(unroll_steps)
        self.solve = check_solver(solve)
        self.hvp_mode = check_hvp_mode(hvp_mode)
        if online is not None and not hasattr(online, "distilled_term"):
            raise TypeError(f"online must be None or a keras_metapt.HyperDistill, got {online!r}")
        if online is not None and gradient_reduction is not None:
            raise ValueError("PTFT(online=HyperDistill(...)) runs on one replica; "
                             "gradient_reduction must be None")
        self.online = online
        self.update_online = bool(update_online)  # False: HyperDistill's state is only read

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        if self.online is not None and problem.outer_loss_scale is not None:
            raise ValueError("PTFT(online=HyperDistill(...)) does not take a problem with "
                             "outer_loss_scale: HyperDistill's fitted scale theta mixes the "
                             "calls' outer gradients (run it in float32 or bfloat16)")
        theta_e, theta_h, psi = params
        meta_train, meta_val = outer_batch
        theta_p = (_tree.to_tensors(theta_e), _tree.to_tensors(theta_h))
        theta_p, hparams = _p.prepare(theta_p, hparams)
        psi, _ = _p.prepare(psi, hparams)
        theta_e, theta_h = theta_p
        K = self.unroll_steps
        reduce = self.gradient_reduction or _identity
        if isinstance(meta_train, _p.StepBatches):
            length = meta_train.length()
            if length is not None and length < K:
                raise InputMismatchError(
                    f"meta_train has {length} batches for unroll_steps={K}")
        if opt_state is None:
            opt_state = self.ft_optimizer.init(psi)

        # a. FT unroll: an inner problem over psi whose "hyperparameters" are theta_E.
        def ft_of(batch_name):
            def loss(s, e, b):
                return _p.loss_value("ft_loss", problem.ft_loss, {
                    "params.encoder": e, "params.ft_head": s, batch_name: b}, e, s, b)
            return loss

        ft_inner = _p.BilevelProblem(inner_loss=ft_of("outer_batch.train"),
                                     outer_loss=ft_of("outer_batch.train"))
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(theta_e))
            psi_k, opt_state_k = _p.run_inner_steps(ft_inner, self.ft_optimizer, psi, opt_state,
                                                    theta_e, meta_train, 0, K, K,
                                                    self.gradient_reduction)
            val_loss = ft_of("outer_batch.val")(psi_k, theta_e, meta_val)
            scale = problem.outer_loss_scale
            if scale is not None:  # recorded by the tape: the backward starts at S * loss
                scale = tf.cast(scale, val_loss.dtype)
            scaled_val_loss = val_loss if scale is None else val_loss * scale
        # dense: outside a while loop (one FT step) the gradients of gathers stay IndexedSlices
        g_ft = reduce(_tree.densify(tape.gradient(
            scaled_val_loss, theta_e, unconnected_gradients=tf.UnconnectedGradients.ZERO)))
        val_loss = reduce(val_loss)

        # b. PT stage: - d <grad L_PT, H^-1 [g_FT; 0]> / d phi over theta_P.
        def pt_of(tp, phi):
            return _p.loss_value("pt_loss", problem.pt_loss, {
                "hparams": phi, "params.encoder": tp[0], "params.pt_head": tp[1],
                "inner_batch": inner_batch}, tp[0], tp[1], phi, inner_batch)

        # first order: P is diagonal, so P [g; 0] = [P g; 0]: the head's zeros as None skip
        # its gradient, JVP and shifted copies
        first_order = hasattr(self.solve, "indirect_term") and self.online is None
        cotangent = (g_ft, tf.nest.map_structure(lambda _: None, theta_h) if first_order
                     else _tree.tree_zeros_like(theta_h))
        if self.online is not None:
            pt_stage = _p.BilevelProblem(inner_loss=lambda tp, phi, _: pt_of(tp, phi),
                                         outer_loss=_no_outer_loss)
            indirect = self.online.distilled_term(pt_stage, theta_p, hparams, inner_batch,
                                                  cotangent, update_state=self.update_online)
        else:
            indirect = implicit_indirect_term(pt_of, theta_p, hparams, cotangent, self.solve,
                                              problem.pt_learning_rate, self.gradient_reduction,
                                              self.hvp_mode, rescale_products=scale is not None)
        if scale is not None:  # S * indirect -> indirect (S as given: uncast, never inf)
            indirect = _tree.tree_map(
                lambda m: None if m is None
                else _p.divide_out_scale(m, problem.outer_loss_scale), indirect)
        no_direct_term = tf.nest.map_structure(lambda _: None, hparams)
        return self._finish(hparams, no_direct_term, indirect, val_loss,
                            PTFTParams(theta_e, theta_h, _tree.tree_stop_gradient(psi_k)),
                            _tree.tree_stop_gradient(opt_state_k))


def _no_outer_loss(*_):
    raise AssertionError("the PT stage of an online PTFT has no outer loss of its own")


def split_xy(batch):
    """(x, y) from a batch that is (x, y), (x,) or x (then y is None)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    return batch, None


def replica_share(loss, x):
    """The loss as this replica's share of the global-batch mean (times 1 with one replica):
    summed over replicas it is the mean over the global batch."""
    return loss * distribute.shard_fraction(x, loss.dtype)


def _values(layer):
    return ([tf.convert_to_tensor(v.value) for v in layer.trainable_variables],
            [tf.convert_to_tensor(v.value) for v in layer.non_trainable_variables])


def keras_problem(encoder, pt_head, ft_head, meta_layer, pt_loss, ft_loss, meta_role="loss",
                  training=False, pt_learning_rate=None, outer_loss_scale=None):
    """The PT/FT problem of Keras parts at their current weights: (problem, params, phi).

    ``pt_loss(y_true, y_pred, meta_output) -> scalar`` with ``meta_output`` = meta_layer(x)
    for ``meta_role="loss"`` (e.g. task weights) and None for ``"inputs"`` (the meta layer
    transforms the PT inputs, e.g. a learned augmentation); ``ft_loss(y_true, y_pred)``.
    Batches are (x, y). The losses apply the models statelessly (``training`` is the
    BatchNorm/Dropout mode; non-trainable state is read now and never updated) and are replica
    shares of the global-batch mean. ``params`` is `PTFTParams` of trainable values, ``phi``
    the meta layer's trainable values.

    Mixed precision: parts with a mixed policy compute in half precision with their float32
    variables (`functional.stateless_call`); predictions and meta outputs reach the losses in
    float32 (`functional.full_precision`). ``outer_loss_scale``: see
    `PretrainFinetuneProblem`.
    """
    if meta_role not in META_ROLES:
        raise ValueError(f"meta_role must be one of {META_ROLES}, got {meta_role!r}")
    theta_e, enc_state = _values(encoder)
    theta_h, head_state = _values(pt_head)
    psi, ft_state = _values(ft_head)
    phi, meta_state = _values(meta_layer)

    def features(theta, x):
        return functional.stateless_call(encoder, theta, enc_state, x, training)[0]

    def pt_of(theta, head, phi_values, batch):
        x, y = split_xy(batch)
        meta_out = None
        if meta_role == "inputs":
            x = functional.stateless_call(meta_layer, phi_values, meta_state, x, True)[0]
        else:
            meta_out = functional.full_precision(
                functional.stateless_call(meta_layer, phi_values, meta_state, x)[0])
        preds = functional.stateless_call(pt_head, head, head_state, features(theta, x),
                                          training)[0]
        return replica_share(pt_loss(y, functional.full_precision(preds), meta_out), x)

    def ft_of(theta, psi_values, batch):
        x, y = split_xy(batch)
        preds = functional.stateless_call(ft_head, psi_values, ft_state, features(theta, x),
                                          training)[0]
        return replica_share(ft_loss(y, functional.full_precision(preds)), x)

    problem = PretrainFinetuneProblem(pt_of, ft_of, pt_learning_rate, outer_loss_scale)
    return problem, PTFTParams(theta_e, theta_h, psi), phi
