"""Learned data augmentation: a layer taking inputs and noise, whose weights are phi.

A learned augmentation is reparameterised: ``transform(inputs, noise)`` is differentiable in
its weights, and the noise is drawn from the layer's own `keras.random.SeedGenerator` (whose
state is a non-trainable variable, so it is checkpointed and replayed exactly). Subclasses
implement ``transform`` and, if needed, ``noise_shape``.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_metapt.functional import HALF_PRECISION

__all__ = ["LearnedAugmentation", "LearnedGaussianNoise", "LearnedTimeWarp", "LearnedSpatialWarp",
           "SignalCutoutNoise", "RandomCropFlip", "TwoViews"]


class LearnedAugmentation(keras.layers.Layer):
    """Base class: ``call(x, training)`` draws noise and returns ``transform(x, noise)``.

    At inference (training=False) the input passes through unchanged.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def noise_shape(self, input_shape):
        """Shape of the standard-normal noise for inputs of ``input_shape`` (default: same)."""
        return input_shape

    def transform(self, inputs, noise):
        raise NotImplementedError

    def call(self, inputs, training=False):
        if not training:
            return inputs
        noise = keras.random.normal(self.noise_shape(tf.shape(inputs)), dtype=inputs.dtype,
                                    seed=self.seed_generator)
        return self.transform(inputs, noise)


class LearnedGaussianNoise(LearnedAugmentation):
    """x + exp(log_scale) * noise with one learned log-scale per feature (last axis)."""

    def __init__(self, initial_scale=0.1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.initial_scale = float(initial_scale)

    def build(self, input_shape):
        self.log_scale = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(tf.math.log(self.initial_scale).numpy()),
            name="log_scale")

    def transform(self, inputs, noise):
        return inputs + tf.exp(self.log_scale) * noise


# ----------------------------------------------------------------------------- warps
# Maps are represented by displacements in grid-index units: position p = index + d(index).

def _interp1d(values, positions):
    """Linear interpolation of values [B, N, ...] at positions [B, P] (index units, clamped
    to [0, N-1]). Exact at integer positions; differentiable in values and positions."""
    n = tf.shape(values)[1]
    last = tf.cast(n - 1, positions.dtype)
    positions = tf.clip_by_value(positions, 0.0, last)
    lower = tf.floor(positions)
    frac = positions - lower
    lo = tf.cast(lower, tf.int32)
    hi = tf.minimum(lo + 1, n - 1)
    v_lo = tf.gather(values, lo, batch_dims=1)
    v_hi = tf.gather(values, hi, batch_dims=1)
    extra = len(values.shape) - 2
    frac = tf.reshape(frac, tf.concat([tf.shape(frac), tf.ones([extra], tf.int32)], 0))
    return v_lo + frac * (v_hi - v_lo)


def _interp2d(values, rows, cols):
    """Bilinear interpolation of values [B, H, W, C] at (rows, cols) [B, P, Q] (index units,
    clamped). Exact at integer positions."""
    height, width = tf.shape(values)[1], tf.shape(values)[2]
    rows = tf.clip_by_value(rows, 0.0, tf.cast(height - 1, rows.dtype))
    cols = tf.clip_by_value(cols, 0.0, tf.cast(width - 1, cols.dtype))
    r0, c0 = tf.floor(rows), tf.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = tf.cast(r0, tf.int32), tf.cast(c0, tf.int32)
    r1, c1 = tf.minimum(r0 + 1, height - 1), tf.minimum(c0 + 1, width - 1)

    def at(r, c):
        return tf.gather_nd(values, tf.stack([r, c], axis=-1), batch_dims=1)

    top = at(r0, c0) + fc * (at(r0, c1) - at(r0, c0))
    bottom = at(r1, c0) + fc * (at(r1, c1) - at(r1, c0))
    return top + fr * (bottom - top)


def _gaussian_kernel(sigma, radius):
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _smooth_axis(values, kernel, axis):
    """Convolution with ``kernel`` along ``axis`` (1 or 2) of D_ext, the odd (point) reflection
    of D about its end values: D_ext[-j] = 2 D[0] - D[j]. This keeps the end values (a
    displacement that is 0 at the ends stays 0 there) and keeps i + D[i] monotone (every
    difference of D_ext is one of D's differences, and the kernel is a positive average).
    ``values``: [B, T] (axis 1) or [B, H, W, C] (axis 1 or 2).
    """
    radius = (len(kernel) - 1) // 2
    flat = len(values.shape) == 2
    x = values[:, :, None, None] if flat else values
    n = x.shape[axis]
    if n is not None and n <= radius:
        raise ValueError(f"smoothing radius {radius} needs more than {radius} samples, got {n}")
    first = tf.gather(x, [0], axis=axis)
    last = tf.gather(x, [tf.shape(x)[axis] - 1], axis=axis)
    head = 2.0 * first - tf.reverse(tf.gather(x, tf.range(1, radius + 1), axis=axis), [axis])
    tail = 2.0 * last - tf.reverse(
        tf.gather(x, tf.range(tf.shape(x)[axis] - radius - 1, tf.shape(x)[axis] - 1), axis=axis),
        [axis])
    padded = tf.concat([head, x, tail], axis=axis)
    channels = x.shape[-1]
    taps = tf.constant(kernel, x.dtype)
    shape = [len(kernel), 1] if axis == 1 else [1, len(kernel)]
    taps = tf.tile(tf.reshape(taps, shape + [1, 1]), [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, taps, [1, 1, 1, 1], "VALID")
    return out[:, :, 0, 0] if flat else out


def _softplus_inverse(value):
    return float(np.log(np.expm1(value)))


class _WarpBase(LearnedAugmentation):
    """Shared parts: the global strength, the per-example magnitude network, the grid settings.

    The amplitude of example i is ``strength * m_i``:
      strength = softplus(rho) > 0, one learned scalar (``strength_logit``). It has no dead
        point: the warp's effect is not even in it (an amplitude of either sign would be), and
        under Adam rho moves by about the learning rate per step, so small strengths change
        by a factor, not by a fixed amount. Give it its own optimizer group and rate
        (`MetaPretrainer.compile(hyper_optimizer=[(opt, vars), ...])`).
      m_i = B softmax_i(CNN(x)) (``per_example=True``): positive, batch mean exactly 1, so the
        network only redistributes the strength over the examples of a batch; its last layer
        starts at zero, so every m_i starts at 1. ``per_example=False``: m_i = 1 (no network).
        Under tf.distribute the batch is each replica's shard: the mean is 1 per replica.

    Under a mixed-precision policy (float16/bfloat16 compute) a warp computes in float32:
    its sampling positions are time/pixel indices (up to 1023 for a 1000-sample ECG), which
    half precision cannot resolve (bfloat16 rounds 1023 to 1024). Its output is float32; the
    encoder casts it to its own compute dtype.
    """

    def __init__(self, grid_size, squaring_steps, initial_strength, per_example, smoothing_sigma,
                 filters, seed, **kwargs):
        policy = keras.dtype_policies.get(kwargs.get("dtype") or keras.config.dtype_policy())
        if policy.compute_dtype in HALF_PRECISION:
            kwargs["dtype"] = "float32"
        super().__init__(seed=seed, **kwargs)
        if int(grid_size) < 3:
            raise ValueError(f"grid_size must be >= 3, got {grid_size}")
        if not float(initial_strength) > 0:
            raise ValueError(f"initial_strength must be > 0 (the strength is softplus(rho)), got "
                             f"{initial_strength}; for no warp, leave the layer out")
        self.grid_size = int(grid_size)
        self.filters = tuple(int(f) for f in filters)
        self.squaring_steps = int(squaring_steps)
        self.initial_strength = float(initial_strength)
        self.per_example = bool(per_example)
        self.smoothing_sigma = None if smoothing_sigma is None else float(smoothing_sigma)

    def _kernel(self, samples):
        """The fixed Gaussian: sigma = ``smoothing_sigma`` samples, default half the spacing of
        the coarse grid (which rounds off the kinks of the linear upsampling)."""
        sigma = self.smoothing_sigma
        if sigma is None:
            sigma = 0.5 * (samples - 1) / (self.grid_size - 1)
        radius = max(1, min(int(np.ceil(2.5 * sigma)), samples - 1))
        return _gaussian_kernel(max(sigma, 1e-3), radius)

    def _magnitude_layers(self):
        """The strided convolutions and the global pooling of the magnitude network."""
        raise NotImplementedError

    def build(self, input_shape):
        if self.per_example:
            self.magnitude_net = keras.Sequential(
                self._magnitude_layers() + [keras.layers.Dense(  # no bias: softmax ignores it
                    1, use_bias=False, kernel_initializer="zeros", dtype=self.dtype_policy)],
                name="magnitude_net")
            self.magnitude_net.build(input_shape)
        self.strength_logit = self.add_weight(shape=(), initializer=keras.initializers.Constant(
            _softplus_inverse(self.initial_strength)), name="strength_logit")

    @property
    def strength(self):
        """softplus(rho): the global strength (a fraction of the signal length / image size)."""
        return tf.nn.softplus(self.strength_logit)

    def magnitude(self, inputs):
        """m [batch]: B softmax(CNN(inputs)) (batch mean 1), or ones without the network."""
        if not self.per_example:
            return tf.ones(tf.shape(inputs)[:1], inputs.dtype)
        logits = self.magnitude_net(inputs)[:, 0]
        return tf.cast(tf.shape(logits)[0], logits.dtype) * tf.nn.softmax(logits)

    def amplitude(self, inputs):
        """strength * m_i [batch]: the standard deviation of example i's velocity field."""
        return self.strength * self.magnitude(inputs)


class LearnedTimeWarp(_WarpBase):
    """A stochastic, smooth, invertible time warp with a learned per-example magnitude.

    For signals x [batch, time, channels]:
      v = strength * m * eps (see the amplitude below), eps ~ N(0, 1) on a coarse grid of
      ``grid_size`` points over [0, 1] (zero at both ends, which stay fixed);
      phi = exp(v) by scaling and squaring: d = v / 2^S, then S times d <- d + d o (id + d);
      the displacement is upsampled linearly to every time step, smoothed with a fixed Gaussian
      (odd reflection at the ends, which stay fixed) and x is resampled linearly at
      p(t) = t + D(t).
    Each step preserves monotonicity, so p is a non-decreasing time map (order-preserving);
    with a zero velocity it is exactly the identity. Differentiable in the CNN weights and
    the strength (phi) through the reparameterised noise. Cost: O(batch * time * channels).

    Amplitude (`_WarpBase`): strength = softplus(rho) > 0, global; m_i = B softmax(CNN(x))_i,
    per example with batch mean 1 (or 1 with ``per_example=False``).
    """

    def __init__(self, grid_size=16, squaring_steps=6, initial_strength=0.05, per_example=True,
                 smoothing_sigma=None, filters=(8, 16), seed=None, **kwargs):
        super().__init__(grid_size, squaring_steps, initial_strength, per_example,
                         smoothing_sigma, filters, seed, **kwargs)

    def _magnitude_layers(self):
        return [keras.layers.Conv1D(f, 9, strides=4, padding="same", activation="relu",
                                    dtype=self.dtype_policy) for f in self.filters] + [
            keras.layers.GlobalAveragePooling1D(dtype=self.dtype_policy)]

    def noise_shape(self, input_shape):
        return tf.stack([input_shape[0], self.grid_size])

    def time_map(self, inputs, noise):
        """p(t) [batch, time] in time-index units for these inputs and this noise."""
        length = tf.shape(inputs)[1]
        g = self.grid_size
        edges = tf.concat([[0.0], tf.ones([g - 2]), [0.0]], 0)
        velocity = self.amplitude(inputs)[:, None] * noise * tf.cast(edges, noise.dtype)
        # grid-index units: the domain [0, 1] spans g - 1 grid intervals
        disp = velocity * tf.cast(g - 1, noise.dtype) / 2.0 ** self.squaring_steps
        grid = tf.cast(tf.range(g), disp.dtype)[None, :]
        for _ in range(self.squaring_steps):
            disp = disp + _interp1d(disp, grid + disp)
        t = tf.cast(tf.range(length), disp.dtype)
        at_grid = t * tf.cast(g - 1, disp.dtype) / tf.cast(length - 1, disp.dtype)
        batch = tf.shape(inputs)[0]
        disp_t = _interp1d(disp, tf.tile(at_grid[None, :], [batch, 1]))
        disp_t = disp_t * tf.cast(length - 1, disp.dtype) / tf.cast(g - 1, disp.dtype)
        kernel = self._kernel(inputs.shape[1])
        # The ends stay fixed (zero displacement); the clip only guards round-off.
        return tf.clip_by_value(t[None, :] + _smooth_axis(disp_t, kernel, axis=1), 0.0,
                                tf.cast(length - 1, disp.dtype))

    def transform(self, inputs, noise):
        return _interp1d(inputs, self.time_map(inputs, noise))


class LearnedSpatialWarp(_WarpBase):
    """The 2-D version for images x [batch, height, width, channels]: a velocity field
    strength * m * eps [grid, grid, 2] (zero on the border), integrated by scaling and
    squaring, upsampled bilinearly, smoothed with a separable Gaussian, applied by bilinear
    resampling. Identity at zero velocity; a diffeomorphism for small fields (positive
    Jacobian). Amplitude as in `LearnedTimeWarp`."""

    def __init__(self, grid_size=5, squaring_steps=6, initial_strength=0.05, per_example=True,
                 smoothing_sigma=None, filters=(8, 16), seed=None, **kwargs):
        super().__init__(grid_size, squaring_steps, initial_strength, per_example,
                         smoothing_sigma, filters, seed, **kwargs)

    def _magnitude_layers(self):
        return [keras.layers.Conv2D(f, 3, strides=2, padding="same", activation="relu",
                                    dtype=self.dtype_policy) for f in self.filters] + [
            keras.layers.GlobalAveragePooling2D(dtype=self.dtype_policy)]

    def noise_shape(self, input_shape):
        return tf.stack([input_shape[0], self.grid_size, self.grid_size, 2])

    def sampling_grid(self, inputs, noise):
        """(rows, cols) [batch, height, width] where each output pixel samples the input."""
        height, width = tf.shape(inputs)[1], tf.shape(inputs)[2]
        g = self.grid_size
        inner = tf.pad(tf.ones([g - 2, g - 2]), [[1, 1], [1, 1]])[None, :, :, None]
        velocity = self.amplitude(inputs)[:, None, None, None] * noise
        disp = velocity * tf.cast(inner, noise.dtype) * tf.cast(g - 1, noise.dtype)
        disp = disp / 2.0 ** self.squaring_steps
        gr, gc = tf.meshgrid(tf.range(g), tf.range(g), indexing="ij")
        gr = tf.cast(gr, disp.dtype)[None]
        gc = tf.cast(gc, disp.dtype)[None]
        for _ in range(self.squaring_steps):
            disp = disp + _interp2d(disp, gr + disp[..., 0], gc + disp[..., 1])
        batch = tf.shape(inputs)[0]
        rr, cc = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
        rr, cc = tf.cast(rr, disp.dtype), tf.cast(cc, disp.dtype)
        to_grid_r = rr * tf.cast(g - 1, disp.dtype) / tf.cast(height - 1, disp.dtype)
        to_grid_c = cc * tf.cast(g - 1, disp.dtype) / tf.cast(width - 1, disp.dtype)
        disp_px = _interp2d(disp, tf.tile(to_grid_r[None], [batch, 1, 1]),
                            tf.tile(to_grid_c[None], [batch, 1, 1]))
        scale_px = tf.stack([tf.cast(height - 1, disp.dtype), tf.cast(width - 1, disp.dtype)])
        disp_px = disp_px * scale_px / tf.cast(g - 1, disp.dtype)
        disp_px = _smooth_axis(disp_px, self._kernel(inputs.shape[1]), axis=1)
        disp_px = _smooth_axis(disp_px, self._kernel(inputs.shape[2]), axis=2)
        return rr[None] + disp_px[..., 0], cc[None] + disp_px[..., 1]

    def transform(self, inputs, noise):
        rows, cols = self.sampling_grid(inputs, noise)
        return _interp2d(inputs, rows, cols)


# ----------------------------------------------------------------------------- fixed ones

class SignalCutoutNoise(keras.layers.Layer):
    """Default 1-D augmentation (fixed, no weights): per channel, zero one random window of
    ``cutout_fraction`` of the length, and add Gaussian noise of ``noise_std`` times that
    channel's standard deviation (per example). Identity at inference."""

    def __init__(self, cutout_fraction=0.1, noise_std=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.cutout_fraction = float(cutout_fraction)
        self.noise_std = float(noise_std)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        shape = tf.shape(inputs)
        batch, length, channels = shape[0], shape[1], shape[2]
        window = tf.cast(tf.round(self.cutout_fraction * tf.cast(length, tf.float32)), tf.int32)
        start = keras.random.randint([batch, 1, channels], 0, tf.maximum(length - window, 1),
                                     seed=self.seed_generator)
        t = tf.range(length)[None, :, None]
        keep = tf.cast(tf.logical_or(t < start, t >= start + window), inputs.dtype)
        std = tf.math.reduce_std(inputs, axis=1, keepdims=True)
        noise = keras.random.normal(shape, dtype=inputs.dtype, seed=self.seed_generator)
        return inputs * keep + self.noise_std * std * noise


class RandomCropFlip(keras.layers.Layer):
    """Default 2-D augmentation (fixed, no weights), drawn per example: zero-pad by ``pad``
    pixels and crop back to the input size at an offset (dy, dx) uniform in [0, 2 pad]^2 (a
    shift by up to ``pad`` pixels, zeros shifted in), then flip horizontally with probability
    1/2. Offsets and flips are separate draws from the layer's seed generator, so they are
    independent of each other and across examples (Keras' RandomCrop uses one offset for the
    whole batch). Identity at inference. Cost: two gathers per batch."""

    def __init__(self, pad=3, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.pad = int(pad)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def crop_flip(self, inputs, offsets, flips):
        """The deterministic transform: ``offsets`` [batch, 2] int32 in [0, 2 pad], ``flips``
        [batch] bool."""
        p = self.pad
        height, width = tf.shape(inputs)[1], tf.shape(inputs)[2]
        padded = tf.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]])
        rows = tf.range(height)[None, :] + offsets[:, :1]
        cols = tf.range(width)[None, :] + offsets[:, 1:]
        cols = tf.where(flips[:, None], cols[:, ::-1], cols)
        out = tf.gather(padded, rows, axis=1, batch_dims=1)
        return tf.gather(out, cols, axis=2, batch_dims=1)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        batch = tf.shape(inputs)[:1]
        offsets = keras.random.randint(tf.concat([batch, [2]], 0), 0, 2 * self.pad + 1,
                                       seed=self.seed_generator, dtype="int32")
        flips = keras.random.uniform(batch, seed=self.seed_generator) < 0.5
        return self.crop_flip(inputs, offsets, flips)


class TwoViews(keras.layers.Layer):
    """Two augmented views stacked on the batch axis: concat([aug(x), aug(x)]) with
    aug = learned(fixed(x)) and independent randomness per view ([2 batch, ...]).
    Its trainable weights are the learned augmentation's (phi); ``learned`` may be None (only
    the fixed augmentation: plain SimCLR)."""

    def __init__(self, fixed=None, learned=None, **kwargs):
        super().__init__(**kwargs)
        self.fixed = fixed
        self.learned = learned

    def build(self, input_shape):
        for part in (self.fixed, self.learned):
            if part is not None and not part.built:
                part.build(input_shape)

    def view(self, inputs, training=True):
        x = inputs if self.fixed is None else self.fixed(inputs, training=training)
        return x if self.learned is None else self.learned(x, training=training)

    def call(self, inputs, training=True):
        return tf.concat([self.view(inputs, training), self.view(inputs, training)], axis=0)
