"""EvoGrad hypergradients: first-order only (Bohdal et al. 2021).

    theta_k = theta + eps_k,   eps_k ~ sigma * N(0, I) or sigma * Rademacher,  k = 1..K
    l_k     = L_in(theta_k, phi, b)    (or all K at once: `BilevelProblem.inner_loss_at_points`)
    w       = softmax(-l / tau)
    theta*  = sum_k w_k theta_k
    hypergradient = d L_out(theta*, phi) / d phi      (through w only: first derivatives)

For small sigma, E[d theta*/d phi] equals the one-step SGD response
-eta * d grad_theta L_in / d phi with eta = sigma^2 (K - 1) / (K tau): choose sigma and
tau so that eta is a sensible inner learning rate (tiny sigma with small tau
saturates the softmax or makes the signal vanish).

Cost: K inner-loss forwards + 1 outer gradient + 1 backward through the K losses
(no second-order terms), plus the noise: one Philox call per parameter leaf for all K copies
(`perturbations`; Rademacher signs come 32 to a drawn word). Memory: O(K * P).
"""

import tensorflow as tf

from keras_metapt import _tree, distribute
from keras_metapt.hypergrad import problem as _p

__all__ = ["EvoGrad", "perturbations"]

_NOISES = ("gaussian", "rademacher")
_BITS = 32  # random signs per drawn int32 word


def perturbations(leaf, seed, num_copies, sigma, noise="gaussian"):
    """sigma * eps for ``num_copies`` copies of ``leaf``: a [K, *leaf.shape] tensor.

    One stateless Philox call per leaf (``seed``: shape [2]), drawn in float32 or int32 and
    cast, so one seed gives the same perturbation in every dtype:
    - gaussian: eps = stateless_normal([K, *shape], seed);
    - rademacher: W = ceil(n / 32) full-range int32 words per copy,
      words = stateless_uniform([K, W], seed, int32); sign j of word w is bit j
      (``(word >> j) & 1``, 1 -> +1, 0 -> -1) and goes to element 32 w + j of the flattened
      leaf (the first n of 32 W). A 32nd of the random numbers of one draw per element.
    Cost: one Philox call and a few elementwise passes over K * n values.
    XLA's and TensorFlow's CPU random kernels draw different numbers for the same seed: a
    seed reproduces a draw within one compilation mode.
    """
    shape = tf.shape(leaf)
    size = tf.size(leaf)
    if noise == "gaussian":
        eps = tf.random.stateless_normal(tf.concat([[num_copies], shape], 0), seed,
                                         dtype=tf.float32, alg="philox")
        return _tree.cast_scalar(sigma, leaf.dtype) * tf.cast(eps, leaf.dtype)
    words = tf.random.stateless_uniform(
        tf.stack([num_copies, (size + _BITS - 1) // _BITS]), seed, minval=None, maxval=None,
        dtype=tf.int32, alg="philox")
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(words[:, :, None], tf.range(_BITS, dtype=tf.int32)), 1)
    bits = tf.reshape(bits, [num_copies, -1])[:, :size]
    # bit -> sigma (2 bit - 1)
    two_sigma = _tree.cast_scalar(2 * sigma, leaf.dtype)
    eps = tf.cast(bits, leaf.dtype) * two_sigma - _tree.cast_scalar(sigma, leaf.dtype)
    return tf.reshape(eps, tf.concat([[num_copies], shape], 0))


class EvoGrad(_p.Estimator):
    """EvoGrad estimator.

    Args:
      num_copies: K >= 2 perturbed copies of the parameters.
      sigma: noise scale.
      temperature: tau of the softmax over negative losses.
      noise: "gaussian" or "rademacher".
      seed: int seed of the estimator's own `tf.random.Generator`; each call
        draws fresh noise from it unless a ``seed`` tensor of shape [2] is passed
        to the call (stateless: the same draw for the same seed, in float32 and float64
        alike, within one compilation mode; XLA's random kernels differ from the others).
      gradient_reduction: None (one device) or a cross-replica sum
        (`keras_metapt.distribute.replica_sum`): the copies' losses and the outer gradients
        are summed over replicas (losses must be replica shares of the global-batch means);
        pass the same ``seed`` tensor on every replica so the copies agree.
      check_finite: see `Estimator`. ``opt_state`` is returned unchanged (no optimizer steps).
    """

    def __init__(self, num_copies=2, sigma=1e-3, temperature=0.05, noise="gaussian", seed=0, *,
                 gradient_reduction=None, check_finite=True):
        super().__init__(gradient_reduction=gradient_reduction, check_finite=check_finite)
        if int(num_copies) < 2:
            raise ValueError(f"num_copies must be >= 2, got {num_copies}")
        if sigma <= 0 or temperature <= 0:
            raise ValueError(f"sigma and temperature must be > 0, got {sigma}, {temperature}")
        if noise not in _NOISES:
            raise ValueError(f"noise must be one of {_NOISES}, got {noise!r}")
        self.num_copies = int(num_copies)
        self.sigma = sigma
        self.temperature = temperature
        self.noise = noise
        self.seed = int(seed)
        self._generator = None

    def _next_seed(self):
        if self._generator is None:
            with tf.init_scope():  # a variable, created outside any tf.function being traced
                self._generator = tf.random.Generator.from_seed(self.seed)
        return self._generator.make_seeds(1)[:, 0]

    @property
    def effective_learning_rate(self):
        """eta = sigma^2 (K - 1) / (K tau): the one-step SGD rate EvoGrad mimics."""
        K = self.num_copies
        return self.sigma ** 2 * (K - 1) / (K * self.temperature)

    def _perturbations(self, leaf, seed):
        """The K perturbations of one leaf, as a [K, *leaf.shape] tensor: one random-number
        call per leaf for all copies (see `perturbations`)."""
        return perturbations(leaf, seed, self.num_copies, self.sigma, self.noise)

    @_p.names_shape_errors
    def __call__(self, problem, params, hparams, inner_batch, outer_batch, *, opt_state=None,
                 seed=None):
        params, hparams = _p.prepare(params, hparams)
        if isinstance(inner_batch, _p.StepBatches):
            raise ValueError("EvoGrad takes one inner batch; got StepBatches")
        params = _tree.tree_stop_gradient(params)
        reduce = self.gradient_reduction
        if seed is None:
            if reduce is not None:
                raise ValueError("with a gradient_reduction, pass the same seed tensor (shape "
                                 "[2]) on every replica")
            seed = self._next_seed()
        leaves = tf.nest.flatten(params)
        # One independent stateless seed per leaf; its K copies' noise in one draw.
        seeds = tf.random.experimental.stateless_split(seed, len(leaves))
        perturbed = [tf.expand_dims(x, 0) + self._perturbations(x, seeds[i])
                     for i, x in enumerate(leaves)]
        copies = [tf.nest.pack_sequence_as(params, [p[k] for p in perturbed])
                  for k in range(self.num_copies)]

        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(hparams))
            losses = _p.inner_loss_values_at_points(problem, copies, hparams, inner_batch)
            if reduce is not None:
                losses = reduce(losses)
            weights = tf.nn.softmax(-losses / _tree.cast_scalar(self.temperature, losses.dtype))
            combined = tf.nest.map_structure(
                lambda *xs: tf.add_n([weights[k] * x for k, x in enumerate(xs)]), *copies)
            outer_loss, g_params, direct = _p.outer_gradients(problem, combined, hparams,
                                                              outer_batch, reduce)
            surrogate = _tree.tree_vdot(_tree.tree_stop_gradient(g_params), combined)
            if reduce is not None:  # same surrogate on every replica: each seeds 1/R
                surrogate = surrogate / tf.cast(distribute.num_replicas(), surrogate.dtype)
        indirect = tape.gradient(surrogate, hparams)
        if reduce is not None:
            indirect = reduce(indirect)
        return self._finish(hparams, direct, indirect, outer_loss,
                            _tree.tree_stop_gradient(combined), opt_state,
                            scale=problem.outer_loss_scale)
