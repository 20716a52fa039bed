"""Differentiable inner optimizers as pure functions.

An `InnerOptimizer` is a pair of pure functions, as in optax:

    state = opt.init(params)
    new_params, new_state = opt.update(grads, state, params, **overrides)

Everything is TensorFlow ops on nests of tensors, so an update can be
differentiated (reverse mode through a `tf.GradientTape`, forward mode through a
`tf.autodiff.ForwardAccumulator`) and compiled with `tf.function(jit_compile=True)`.

``overrides`` replace the optimizer's hyperparameters for one call (for example
``learning_rate=lr_schedule[t]``). They may be tensors that carry gradients, which
is how learning-rate, momentum and weight-decay schedules are meta-learned.
Each optimizer lists the names it accepts in ``opt.hyperparameters``.

`mirror_keras(keras_optimizer, variables)` gives the differentiable twin of a Keras SGD or
Adam and its current state, so an unroll continues from the live optimizer (as the official
code of Raghu et al. does for the FT head).

Cost: O(P) time per update; state memory 0 (SGD), P (momentum) or 2P (Adam).
"""

from typing import Any, Callable, Mapping, NamedTuple

import tensorflow as tf

from keras_metapt._tree import cast_scalar

__all__ = ["InnerOptimizer", "sgd", "ema_momentum_sgd", "adam", "adamw", "mirror_keras"]


class InnerOptimizer(NamedTuple):
    """A differentiable optimizer: ``init(params) -> state`` and
    ``update(grads, state, params, **overrides) -> (new_params, new_state)``.

    ``hyperparameters`` maps each overridable name to its default value. ``elementwise``:
    each leaf's update depends only on that leaf's gradient, parameter and state, and the
    state is a nest shaped like the parameters or a tuple of such nests and scalars (every
    optimizer here); `keras_metapt.hypergrad.sama.optimizer_preconditioned` then works one
    leaf at a time. ``affine_in_gradient``: the update is affine in the gradient with
    coefficients that do not depend on it (`sgd`, `ema_momentum_sgd`), so the update's VJP
    with respect to (params, state, grads) needs no gradient value; `Unrolled(backward=
    "mixed")` then stores no per-step gradients.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple]
    hyperparameters: Mapping[str, float]
    elementwise: bool = False
    affine_in_gradient: bool = False


def _resolve(defaults, overrides, optimizer_name):
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"{optimizer_name} has no hyperparameter {unknown[0]!r}; it accepts "
            f"{sorted(defaults)}")
    values = dict(defaults)
    values.update(overrides)
    return values


def _cast(value, like):
    return cast_scalar(value, like.dtype)


def sgd(learning_rate, momentum=None, nesterov=False, weight_decay=0.0):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    With g' = g + wd * p:
      no momentum:  p <- p - lr * g'
      momentum:     v <- mu * v + g';  p <- p - lr * v            (heavy ball)
      Nesterov:     v <- mu * v + g';  p <- p - lr * (g' + mu * v)

    ``momentum=None`` keeps no velocity state (and momentum cannot be overridden);
    pass ``momentum=0.0`` to keep the state so that a momentum schedule can be
    meta-learned from zero. Overridable: learning_rate, weight_decay, and momentum
    when enabled.
    """
    has_velocity = momentum is not None
    defaults = {"learning_rate": learning_rate, "weight_decay": weight_decay}
    if has_velocity:
        defaults["momentum"] = momentum
    name = "sgd"

    def init(params):
        if not has_velocity:
            return ()
        return tf.nest.map_structure(tf.zeros_like, params)

    def update(grads, state, params, **overrides):
        hp = _resolve(defaults, overrides, name)
        flat_p = tf.nest.flatten(params)
        flat_g = tf.nest.flatten(grads)
        flat_v = tf.nest.flatten(state) if has_velocity else [None] * len(flat_p)
        new_p, new_v = [], []
        for p, g, v in zip(flat_p, flat_g, flat_v):
            lr = _cast(hp["learning_rate"], p)
            g = g + _cast(hp["weight_decay"], p) * p
            if has_velocity:
                mu = _cast(hp["momentum"], p)
                v = mu * v + g
                step = g + mu * v if nesterov else v
                new_v.append(v)
            else:
                step = g
            new_p.append(p - lr * step)
        new_params = tf.nest.pack_sequence_as(params, new_p)
        new_state = tf.nest.pack_sequence_as(state, new_v) if has_velocity else ()
        return new_params, new_state

    return InnerOptimizer(init, update, defaults, elementwise=True, affine_in_gradient=True)


def ema_momentum_sgd(learning_rate, momentum=0.9):
    """SGD with an averaged velocity, the form of Maclaurin, Duvenaud & Adams (2015):

      v <- gamma v - (1 - gamma) g;   p <- p + lr * v

    The velocity is an exponential moving average of the negative gradients, so gamma trades
    memory of past gradients against the current one without rescaling the step.
    `keras_metapt.hypergrad.Reversible` runs exactly these steps backwards; `Unrolled` and
    `Forward` take this optimizer for the same trajectory. Overridable: learning_rate,
    momentum. State: one velocity (P memory).
    """
    defaults = {"learning_rate": learning_rate, "momentum": momentum}
    name = "ema_momentum_sgd"

    def init(params):
        return tf.nest.map_structure(tf.zeros_like, params)

    def update(grads, state, params, **overrides):
        hp = _resolve(defaults, overrides, name)
        new_p, new_v = [], []
        for p, g, v in zip(tf.nest.flatten(params), tf.nest.flatten(grads),
                           tf.nest.flatten(state)):
            gamma = _cast(hp["momentum"], p)
            v = gamma * v - (1 - gamma) * g
            new_v.append(v)
            new_p.append(p + _cast(hp["learning_rate"], p) * v)
        return (tf.nest.pack_sequence_as(params, new_p),
                tf.nest.pack_sequence_as(state, new_v))

    return InnerOptimizer(init, update, defaults, elementwise=True, affine_in_gradient=True)


def adamw(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, eps_root=1e-8,
          weight_decay=0.01):
    """Adam with decoupled weight decay, differentiable to second order.

      m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2;   t <- t + 1
      p <- p - lr * ( m_hat / (sqrt(v_hat + eps_root) + eps) + wd * p )

    ``eps_root`` > 0 sits inside the square root, so d sqrt(v_hat + eps_root) / dv
    stays finite when a gradient is exactly zero (with eps_root = 0 the second
    derivative is 0 * inf = NaN). Overridable: learning_rate, beta_1, beta_2,
    weight_decay. State: an int32 step count and two moments (2P memory).
    """
    if eps_root < 0:
        raise ValueError(f"eps_root must be >= 0, got {eps_root}")
    defaults = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2,
                "weight_decay": weight_decay}
    name = "adamw" if weight_decay else "adam"

    def init(params):
        return (tf.zeros([], tf.int32), tf.nest.map_structure(tf.zeros_like, params),
                tf.nest.map_structure(tf.zeros_like, params))

    def update(grads, state, params, **overrides):
        hp = _resolve(defaults, overrides, name)
        count, m_state, v_state = state
        count = count + 1
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(tf.nest.flatten(params), tf.nest.flatten(grads),
                              tf.nest.flatten(m_state), tf.nest.flatten(v_state)):
            b1 = _cast(hp["beta_1"], p)
            b2 = _cast(hp["beta_2"], p)
            t = tf.cast(count, p.dtype)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * tf.square(g)
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            step = m_hat / (tf.sqrt(v_hat + _cast(eps_root, p)) + _cast(epsilon, p))
            step = step + _cast(hp["weight_decay"], p) * p
            new_p.append(p - _cast(hp["learning_rate"], p) * step)
            new_m.append(m)
            new_v.append(v)
        return (tf.nest.pack_sequence_as(params, new_p),
                (count, tf.nest.pack_sequence_as(m_state, new_m),
                 tf.nest.pack_sequence_as(v_state, new_v)))

    return InnerOptimizer(init, update, defaults, elementwise=True)


def adam(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, eps_root=1e-8):
    """Adam (no weight decay), differentiable to second order; see `adamw`."""
    return adamw(learning_rate, beta_1, beta_2, epsilon, eps_root, weight_decay=0.0)


def _current_learning_rate(optimizer):
    lr = optimizer.learning_rate  # Keras 3: the schedule's value at the current iteration
    return tf.convert_to_tensor(lr() if callable(lr) else lr)


def mirror_keras(optimizer, variables):
    """(InnerOptimizer, state): the differentiable twin of a Keras optimizer and its current
    state for ``variables`` (read now, as tensors; the Keras optimizer is not changed).

    Keras `SGD` (momentum, Nesterov; velocity m = mu m - lr g stored, mapped to ours as
    v = -m / lr) and `Adam`/`AdamW` (moments and step count; weight decay as `adamw`). Keras
    puts Adam's epsilon outside the bias correction of v (``eps / sqrt(1 - beta_2^t)`` in our
    form) and has no eps_root, so a twin's step differs from Keras' by O(epsilon). The
    learning rate is the optimizer's current one (a schedule is evaluated now). Any other
    optimizer (or AMSGrad, clipping, EMA, gradient accumulation) raises ValueError.
    A `LossScaleOptimizer` (mixed_float16) is mirrored by its inner optimizer.
    Reads the private per-variable slots of Keras 3 optimizers (pinned by
    tests/test_keras_overrides.py).
    """
    import keras
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # float16: the inner one
        optimizer = optimizer.inner_optimizer
    name = type(optimizer).__name__
    unsupported = [flag for flag in ("clipnorm", "global_clipnorm", "clipvalue")
                   if getattr(optimizer, flag, None)]
    if getattr(optimizer, "use_ema", False):
        unsupported.append("use_ema")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        unsupported.append("gradient_accumulation_steps")
    if getattr(optimizer, "amsgrad", False):
        unsupported.append("amsgrad")
    if unsupported or not isinstance(optimizer, (keras.optimizers.SGD, keras.optimizers.Adam)):
        raise ValueError(f"mirror_keras supports Keras SGD and Adam/AdamW without "
                         f"{', '.join(unsupported) or 'extras'}; got {name}")
    lr = _current_learning_rate(optimizer)
    slots = [optimizer._get_variable_index(v) for v in variables]
    wd = float(optimizer.weight_decay or 0.0)
    if isinstance(optimizer, keras.optimizers.Adam):
        twin = adamw(lr, float(optimizer.beta_1), float(optimizer.beta_2),
                     float(optimizer.epsilon), weight_decay=wd)
        state = (tf.cast(tf.convert_to_tensor(optimizer.iterations), tf.int32),
                 [tf.convert_to_tensor(optimizer._momentums[i]) for i in slots],
                 [tf.convert_to_tensor(optimizer._velocities[i]) for i in slots])
        return twin, state
    if wd:
        raise ValueError("mirror_keras: Keras SGD with weight_decay (decoupled) has no twin here")
    momentum = float(optimizer.momentum)
    if momentum == 0.0:
        return sgd(lr), ()
    twin = sgd(lr, momentum=momentum, nesterov=bool(optimizer.nesterov))
    state = [-tf.convert_to_tensor(optimizer.momentums[i]) / tf.cast(lr, variables[j].dtype)
             for j, i in enumerate(slots)]
    return twin, state
