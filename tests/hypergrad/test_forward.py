"""Forward-mode hypergradients with hyperparameters shared over blocks of steps.

References: central finite differences (float64) of the closed-form quadratic iterate,
and of the SGD-with-momentum recurrence written out in NumPy below; agreement with
reverse mode to 1e-6.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import optim
from keras_metapt.hyper import piecewise_constant
from tests.conftest import central_differences, compiled, rel_err
from tests.hypergrad.quadratic import Quadratic


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("per_step_b", [False, True])
def test_forward_matches_finite_differences_and_reverse(mode, per_step_b):
    quad = Quadratic(num_steps=12, per_step_b=per_step_b)
    params, hparams, inner_batch, target = quad.inputs()
    problem = quad.problem()
    fwd = compiled(lambda p, h: km.Forward(optim.sgd(1.0), 12)(problem, p, h, inner_batch, target),
                   mode)(params, hparams)
    rev = km.Unrolled(optim.sgd(1.0), 12)(problem, params, hparams, inner_batch, target)
    fd = quad.finite_difference(quad.outer_after)
    for f, r, ref in zip(fwd.hypergrad, rev.hypergrad, fd):
        assert rel_err(f, r) < 1e-6
        assert rel_err(f, ref) < 1e-6
    np.testing.assert_allclose(fwd.params[0], rev.params[0], rtol=1e-12)


# --- schedules of learning rate, momentum and weight decay -------------------

D, T, B = 4, 9, 3
RNG = np.random.default_rng(3)
_M = RNG.normal(size=(D, D))
A = _M @ _M.T / D + 0.3 * np.eye(D)
BVEC = RNG.normal(size=D)
TARGET = RNG.normal(size=D)
W0 = RNG.normal(size=D)
LR = np.array([0.3, 0.2, 0.1])
MU = np.array([0.5, 0.7, 0.3])
WD = np.array([0.01, 0.05, 0.02])


def numpy_momentum_sgd_outer(lr, mu, wd, nesterov):
    """The recurrence in NumPy: g' = A w - b + wd w; v = mu v + g'; w -= lr (g' + mu v | v)."""
    w, v = W0.copy(), np.zeros(D)
    for t in range(T):
        k = (t * B) // T
        g = A @ w - BVEC + wd[k] * w
        v = mu[k] * v + g
        w = w - lr[k] * ((g + mu[k] * v) if nesterov else v)
    return 0.5 * np.sum((w - TARGET) ** 2)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lr_momentum_weight_decay_schedules(nesterov):
    def inner(params, hparams, batch):
        w = params[0]
        return 0.5 * tf.tensordot(w, tf.linalg.matvec(tf.constant(A), w), 1) - tf.tensordot(
            tf.constant(BVEC), w, 1)

    def outer(params, hparams, batch):
        return 0.5 * tf.reduce_sum((params[0] - TARGET) ** 2)

    def schedule(h, t, num_steps):
        return {name: piecewise_constant(h[name], t, num_steps)
                for name in ("learning_rate", "momentum", "weight_decay")}

    problem = km.BilevelProblem(inner, outer, inner_optimizer_hparams=schedule)
    opt = optim.sgd(0.1, momentum=0.0, nesterov=nesterov)
    hparams = {"learning_rate": LR, "momentum": MU, "weight_decay": WD}
    fwd = compiled(lambda h: km.Forward(opt, T)(problem, [W0], h, None, None), "xla")(hparams)
    rev = km.Unrolled(opt, T)(problem, [W0], hparams, None, None)
    fd = central_differences(lambda lr, mu, wd: numpy_momentum_sgd_outer(lr, mu, wd, nesterov),
                             [LR, MU, WD])
    for name, ref in zip(("learning_rate", "momentum", "weight_decay"), fd):
        assert rel_err(fwd.hypergrad[name], ref) < 1e-6, name
        assert rel_err(fwd.hypergrad[name], rev.hypergrad[name]) < 1e-6, name


def test_forward_refuses_too_many_hyperparameters():
    quad = Quadratic(num_steps=4)
    params, hparams, inner_batch, target = quad.inputs()
    with pytest.raises(ValueError, match="one JVP per scalar"):
        km.Forward(optim.sgd(1.0), 4, max_hparams=3)(quad.problem(), params, hparams, inner_batch,
                                                     target)


def test_forward_loop_runs_one_step_at_a_time():
    # Memory stays flat in T only if the executor does not overlap steps: the step loop must be
    # a single while op (the graph does not grow with T) with parallel_iterations=1.
    # Reference: the traced graph's While ops and their attributes.
    quad = Quadratic(num_steps=6)
    params, hparams, inner_batch, target = quad.inputs()
    fn = tf.function(lambda p, h: km.Forward(optim.sgd(1.0), 6)(
        quad.problem(), p, h, inner_batch, target).hypergrad)
    graph = fn.get_concrete_function(params, hparams).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 1
    assert loops[0].get_attr("parallel_iterations") == 1
