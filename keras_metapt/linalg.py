"""Second-order linear algebra on nests of tensors, without forming matrices.

For a scalar loss L(theta) (theta a nest of tensors) and a nest v shaped like theta:

  hvp(L, theta, v, mode)            = H v,  H = d2L / dtheta2 (reverse-over-reverse or
                                      forward-over-reverse)
  mixed_vjp(L, theta, phi, v)       = (d2L / dphi dtheta) v  = d/dphi <dL/dtheta, v>
  neumann_inverse_hvp(hvp_fn, b)    ~ H^-1 b by a truncated Neumann series
  conjugate_gradient(hvp_fn, b)     ~ H^-1 b by CG (H symmetric positive definite)
  dense_inverse_hvp(hvp_fn, b)      = H^-1 b exactly, forming H (small problems only)
  max_eigenvalue(hvp_fn, like)      ~ the largest-magnitude eigenvalue of H (power iteration),
                                      to choose a Neumann alpha with alpha * lambda_max < 2

Linear solvers are values with one protocol (as in optax / JAXopt / TorchOpt): configure
once, pass to an estimator, which calls

    x = solve(hvp_fn, b, *, step_size=None, unroll=False)       # x ~ H^-1 b

``hvp_fn(v) -> H v`` on nests shaped like ``b``. ``step_size`` is the inner optimizer's
learning rate where the estimator knows it (`neumann(alpha=None)` uses it as alpha; the
other solvers ignore it); ``unroll=True`` traces the iterations in Python instead of a
`tf.while_loop` (needed when ``hvp_fn`` all-reduces across replicas).

  neumann(num_terms, alpha=None)        num_terms HVPs            memory: 3 nests like b
  cg(max_iterations=10, tolerance=1e-10) <= max_iterations HVPs   memory: 4 nests like b
    (stop_on_negative_curvature=False: exactly max_iterations HVPs when tolerance=0)
  dense()                               P HVPs + O(P^3) solve     memory: O(P^2)

All of them work eagerly and inside `tf.function(jit_compile=True)`; the iterative
solvers use `tf.while_loop`, so the graph does not grow with the number of terms.
"""

import dataclasses
from typing import Optional

import tensorflow as tf

from keras_metapt import _tree, functional

__all__ = [
    "HVP_MODES",
    "hvp",
    "mixed_vjp",
    "neumann_inverse_hvp",
    "conjugate_gradient",
    "conjugate_gradient_with_info",
    "dense_inverse_hvp",
    "max_eigenvalue",
    "neumann",
    "cg",
    "dense",
    "NeumannSolver",
    "CGSolver",
    "DenseSolver",
]


def _gradient(loss_fn, params):
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(params))
        loss = loss_fn(params)
    grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grads


HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")


@functional.with_exact_batch_moments
def hvp(loss_fn, params, vector, mode="reverse_over_reverse"):
    """Hessian-vector product H v.

    ``loss_fn(params) -> scalar``. ``mode``:
      "reverse_over_reverse": the gradient of <gradient, v> (one gradient, then a backward
        pass through it: keeps the first backward pass's graph, about 2-3x a gradient);
      "forward_over_reverse": a JVP of the gradient along v (`tf.autodiff.ForwardAccumulator`
        around a `GradientTape`), the mixed mode of MixFlow-MG: no second backward pass, the
        tangents travel with the gradient computation (about 2x a gradient; less memory).
    Both give H v to rounding. Memory: O(P) beyond the forward pass.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
    if mode == "forward_over_reverse":
        flat_p = tf.nest.flatten(params)
        with tf.autodiff.ForwardAccumulator(
                flat_p, [tf.stop_gradient(v) for v in tf.nest.flatten(vector)]) as acc:
            grads = _gradient(loss_fn, tf.nest.pack_sequence_as(params, flat_p))
        return tf.nest.pack_sequence_as(
            params, acc.jvp(tf.nest.flatten(grads), tf.UnconnectedGradients.ZERO))
    with tf.GradientTape() as outer:
        outer.watch(tf.nest.flatten(params))
        grads = _gradient(loss_fn, params)
        dot = _tree.tree_vdot(grads, tf.nest.map_structure(tf.stop_gradient, vector))
    return outer.gradient(dot, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)


@functional.with_exact_batch_moments
def mixed_vjp(loss_fn, params, hparams, vector, unconnected_gradients=tf.UnconnectedGradients.NONE):
    """(d2 L / dphi dtheta) v = d/dphi <dL(theta, phi)/dtheta, v>.

    ``loss_fn(params, hparams) -> scalar``; ``vector`` is shaped like ``params``;
    the result is shaped like ``hparams`` (None for a leaf that does not enter the
    gradient, unless ``unconnected_gradients`` says ZERO). Cost: about one HVP.
    """
    with tf.GradientTape() as outer:
        outer.watch(tf.nest.flatten(hparams))
        grads = _gradient(lambda p: loss_fn(p, hparams), params)
        dot = _tree.tree_vdot(grads, tf.nest.map_structure(tf.stop_gradient, vector))
    return outer.gradient(dot, hparams, unconnected_gradients=unconnected_gradients)


def neumann_inverse_hvp(hvp_fn, vector, alpha, num_terms, unroll=False):
    """H^-1 v ~ alpha * sum_{j=0..num_terms} (I - alpha H)^j v.

    The series converges to H^-1 v when H is symmetric positive definite and
    alpha * lambda_max(H) < 2; the error after i terms shrinks like
    max_k |1 - alpha lambda_k|^(i+1). ``num_terms`` (i) is the number of HVPs;
    i = 0 gives alpha * v. Cost: i HVPs. Memory: 3 nests shaped like v.
    ``unroll=True`` traces the i terms in Python instead of a `tf.while_loop` (needed when
    ``hvp_fn`` all-reduces across replicas; the graph then grows with i).
    """
    num_terms = int(num_terms)
    if num_terms < 0:
        raise ValueError(f"num_terms must be >= 0, got {num_terms}")
    flat_v = tf.nest.flatten(vector)
    alpha = _tree.cast_scalar(alpha, flat_v[0].dtype)

    def body(j, term, total):
        term = _tree.tree_sub(term, _tree.tree_scale(hvp_fn(term), alpha))
        return j + 1, term, _tree.tree_add(total, term)

    if unroll:
        term = total = vector
        for j in range(num_terms):
            _, term, total = body(j, term, total)
    else:
        _, _, total = tf.while_loop(
            lambda j, term, total: j < num_terms, body, (tf.constant(0), vector, vector),
            maximum_iterations=num_terms)
    return _tree.tree_scale(total, alpha)


def conjugate_gradient(hvp_fn, b, max_iterations=10, tolerance=1e-10, x0=None, unroll=False,
                       stop_on_negative_curvature=True):
    """Solves H x = b by conjugate gradient (H symmetric positive definite).

    Stops after ``max_iterations`` HVPs, when ||r|| <= tolerance * ||b||, or when a
    search direction has non-positive curvature p^T H p <= 0 (H is not positive
    definite there, as for a network's Hessian away from a minimum): the iterate
    reached so far is returned, as in truncated CG, instead of dividing by ~0.
    Exact after at most dim(theta) iterations in exact arithmetic for SPD H.
    ``stop_on_negative_curvature=False`` takes the plain CG step along every direction,
    negative curvature included (the fixed-count CG of libraries that do not check
    curvature; with ``tolerance=0`` it runs exactly ``max_iterations`` HVPs unless the
    residual vanishes); a direction of exactly zero curvature leaves the iterate unchanged.
    On SPD H both settings give the same iterates.
    A non-finite right-hand side gives a non-finite result (never silent zeros).
    Half-precision vectors: inner products and step sizes in float32.
    Cost: one HVP per iteration. Memory: 4 nests shaped like b. Returns x.
    ``unroll=True`` traces ``max_iterations`` iterations in Python (for an all-reducing
    ``hvp_fn``); stopped iterations are masked, so it always runs max_iterations HVPs.
    """
    x, _ = conjugate_gradient_with_info(hvp_fn, b, max_iterations, tolerance, x0, unroll,
                                        stop_on_negative_curvature)
    return x


def conjugate_gradient_with_info(hvp_fn, b, max_iterations=10, tolerance=1e-10, x0=None,
                                 unroll=False, stop_on_negative_curvature=True):
    """`conjugate_gradient`, also returning the number of CG iterations it ran (int32 scalar;
    one HVP each; the iteration that meets non-positive curvature counts)."""
    max_iterations = int(max_iterations)
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    # the scalars (inner products, step sizes) in float32 for half-precision vectors: a
    # float16 squared norm overflows once ||v|| > 256, well inside a loss scale's range
    dtype = tf.nest.flatten(b)[0].dtype
    if dtype in (tf.float16, tf.bfloat16):
        def vdot(u, v):
            return _tree.tree_vdot(*(tf.nest.map_structure(
                lambda t: tf.cast(t, tf.float32), w) for w in (u, v)))
        dtype = tf.float32
    else:
        vdot = _tree.tree_vdot
    if x0 is None:
        x = _tree.tree_zeros_like(b)
        r = b
    else:
        x = x0
        r = _tree.tree_sub(b, hvp_fn(x0))
    p = r
    rs = vdot(r, r)
    threshold = _tree.cast_scalar(tolerance, dtype) ** 2 * vdot(b, b)
    zero = tf.zeros([], dtype)

    def cond(k, x, r, p, rs, stopped):
        # Keep iterating on NaN or inf (a plain "rs > threshold" is False for NaN, and for
        # inf > inf when b itself holds an inf), so a non-finite right-hand side yields a
        # non-finite solution instead of the zero initial guess.
        unconverged = tf.logical_or(rs > threshold, tf.logical_not(tf.math.is_finite(rs)))
        return tf.logical_and(tf.logical_and(k < max_iterations, unconverged),
                              tf.logical_not(stopped))

    def body(k, x, r, p, rs, stopped):
        hp = hvp_fn(p)
        curvature = vdot(p, hp)
        if stop_on_negative_curvature:
            stopped = curvature <= zero  # False for NaN: NaN propagates
            skip = stopped
        else:
            skip = tf.equal(curvature, zero)  # breakdown: no step along p
        step = tf.where(skip, zero, rs / tf.where(skip, tf.ones_like(curvature), curvature))
        x = _tree.tree_axpy(step, p, x)
        r = _tree.tree_axpy(-step, hp, r)
        rs_new = tf.where(stopped, rs, vdot(r, r))
        beta = tf.where(stopped, zero, rs_new / tf.where(rs > zero, rs, tf.ones_like(rs)))
        p = _tree.tree_axpy(beta, p, r)
        return k + 1, x, r, p, rs_new, stopped

    state = (tf.constant(0), x, r, p, rs, tf.constant(False))
    if unroll:
        for _ in range(max_iterations):
            active = cond(*state)
            new = body(*state)
            state = tf.nest.map_structure(lambda n, o: tf.where(active, n, o), new, state)
        k, x = state[0], state[1]
    else:
        k, x, _, _, _, _ = tf.while_loop(cond, body, state, maximum_iterations=max_iterations)
    return x, k


def dense_inverse_hvp(hvp_fn, vector, unroll=False):
    """H^-1 v exactly: forms the P x P matrix H column by column (H e_j = hvp_fn(e_j)) and
    solves with LU.

    For tests and small problems: cost P HVPs plus O(P^3); memory O(P^2). ``unroll=True``
    runs the P HVPs in Python (for an all-reducing ``hvp_fn``; the graph grows with P).
    """
    flat = tf.nest.flatten(vector)
    sizes = [x.shape.num_elements() for x in flat]  # static: P is a Python int
    shapes = [x.shape for x in flat]
    dtype = flat[0].dtype
    dim = sum(sizes)

    def unflatten(vec):
        parts = tf.split(vec, sizes)
        return tf.nest.pack_sequence_as(
            vector, [tf.reshape(part, shape) for part, shape in zip(parts, shapes)])

    def column(j):
        h_e = hvp_fn(unflatten(tf.one_hot(j, dim, dtype=dtype)))
        return tf.concat([tf.reshape(x, [-1]) for x in tf.nest.flatten(h_e)], axis=0)

    if unroll:
        hessian = tf.stack([column(j) for j in range(dim)], axis=1)
    else:
        columns = tf.TensorArray(dtype, size=dim, element_shape=[dim])
        _, columns = tf.while_loop(lambda j, c: j < dim, lambda j, c: (j + 1, c.write(j, column(j))),
                                   (tf.constant(0), columns), maximum_iterations=dim)
        hessian = tf.transpose(columns.stack())
    rhs = tf.concat([tf.reshape(x, [-1]) for x in flat], axis=0)
    return unflatten(tf.linalg.solve(hessian, rhs[:, None])[:, 0])


def max_eigenvalue(hvp_fn, like, num_iterations=20, seed=(0, 0), unroll=False):
    """The eigenvalue of largest magnitude of H, by power iteration from a random start.

    v <- H v / ||H v||, num_iterations times; returns the Rayleigh quotient v^T H v (signed: a
    negative value means H is indefinite and its most negative eigenvalue dominates). The
    start is drawn statelessly from ``seed`` (the same on every replica). The error shrinks
    like (lambda_2 / lambda_1)^(2 k). Cost: num_iterations + 1 HVPs. Memory: 2 nests like
    ``like``. ``unroll=True`` traces the iterations in Python (for an all-reducing hvp_fn).
    Neumann converges for 0 < alpha < 2 / lambda_max when H is positive definite.
    """
    flat = tf.nest.flatten(like)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(flat))
    start = [tf.cast(tf.random.stateless_normal(x.shape, seeds[i], dtype=tf.float32), x.dtype)
             for i, x in enumerate(flat)]

    def normalised(v):
        norm = tf.sqrt(_tree.tree_vdot(v, v))
        return _tree.tree_scale(v, 1.0 / tf.maximum(norm, tf.constant(1e-30, norm.dtype)))

    v = normalised(tf.nest.pack_sequence_as(like, start))
    if unroll:
        for _ in range(int(num_iterations)):
            v = normalised(hvp_fn(v))
    else:
        _, v = tf.while_loop(lambda k, v: k < num_iterations,
                             lambda k, v: (k + 1, normalised(hvp_fn(v))),
                             (tf.constant(0), v), maximum_iterations=int(num_iterations))
    return _tree.tree_vdot(v, hvp_fn(v))


# ---------------------------------------------------------------------------
# The solver protocol: solve(hvp_fn, b, *, step_size=None, unroll=False) -> x ~ H^-1 b.

@dataclasses.dataclass(frozen=True)
class NeumannSolver:
    """H^-1 b ~ alpha sum_{j=0..num_terms} (I - alpha H)^j b (see `neumann_inverse_hvp`).

    ``alpha=None`` takes the ``step_size`` the estimator passes: the inner (PT) optimizer's
    learning rate at the time of the call, so it follows a learning-rate schedule.
    Cost: num_terms HVPs.
    """

    num_terms: int
    alpha: Optional[float] = None

    def __post_init__(self):
        if int(self.num_terms) < 0:
            raise ValueError(f"neumann: num_terms must be >= 0, got {self.num_terms}")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ValueError(f"neumann: alpha must be > 0 (or None), got {self.alpha}")

    def __call__(self, hvp_fn, b, *, step_size=None, unroll=False):
        alpha = self.alpha if self.alpha is not None else step_size
        if alpha is None:
            raise ValueError(
                "neumann(alpha=None) uses the inner optimizer's learning rate as alpha, but this "
                "estimator was given none: pass linalg.neumann(num_terms, alpha=...), or set "
                "the problem's learning rate (BilevelProblem(inner_learning_rate=...))")
        return neumann_inverse_hvp(hvp_fn, b, alpha, int(self.num_terms), unroll)


@dataclasses.dataclass(frozen=True)
class CGSolver:
    """H^-1 b by conjugate gradient (see `conjugate_gradient`). Cost: <= max_iterations HVPs."""

    max_iterations: int = 10
    tolerance: float = 1e-10
    stop_on_negative_curvature: bool = True

    def __post_init__(self):
        if int(self.max_iterations) < 0:
            raise ValueError(f"cg: max_iterations must be >= 0, got {self.max_iterations}")
        if not float(self.tolerance) >= 0:
            raise ValueError(f"cg: tolerance must be >= 0, got {self.tolerance}")

    def __call__(self, hvp_fn, b, *, step_size=None, unroll=False):
        del step_size  # CG needs no step
        return self.solve_with_info(hvp_fn, b, unroll=unroll)[0]

    def solve_with_info(self, hvp_fn, b, *, unroll=False):
        """(x, iterations run): the solve, and how many CG iterations (HVPs) it took."""
        return conjugate_gradient_with_info(
            hvp_fn, b, int(self.max_iterations), self.tolerance, unroll=unroll,
            stop_on_negative_curvature=bool(self.stop_on_negative_curvature))


@dataclasses.dataclass(frozen=True)
class DenseSolver:
    """H^-1 b exactly by forming H (see `dense_inverse_hvp`). Cost: P HVPs + O(P^3)."""

    def __call__(self, hvp_fn, b, *, step_size=None, unroll=False):
        del step_size
        return dense_inverse_hvp(hvp_fn, b, unroll)


def neumann(num_terms, alpha=None):
    """A Neumann-series solver with ``num_terms`` HVPs; ``alpha=None``: the inner optimizer's
    current learning rate (needs alpha * lambda_max(H) < 2 to converge)."""
    return NeumannSolver(int(num_terms), alpha)


def cg(max_iterations=10, tolerance=1e-10, stop_on_negative_curvature=True):
    """A conjugate-gradient solver: at most ``max_iterations`` HVPs, stops at
    ||r|| <= tolerance ||b|| or at non-positive curvature. With
    ``stop_on_negative_curvature=False`` (and ``tolerance=0``) it runs a fixed
    ``max_iterations`` plain CG steps, as libraries that do not check curvature do.
    ``cg(...).solve_with_info(hvp_fn, b)`` also returns the iterations run."""
    return CGSolver(int(max_iterations), tolerance, bool(stop_on_negative_curvature))


def dense():
    """The exact solver (forms the Hessian): tests and small problems only."""
    return DenseSolver()
