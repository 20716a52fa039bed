"""A hypergradient call with a small fixed cost: traced once per argument signature, then
called with its flat tensors.

`tf.function` matches every call's arguments against its traced signatures in Python, leaf
by leaf: on the reference MLP problem of `benchmarks.hypergrad` (11 argument tensors) that
binding alone costs about 0.5 ms a call, a third of one inner gradient of that MLP. Through
`compile_hypergradient` a call flattens its arguments, looks the trace up by the leaves'
shapes and dtypes, checks the nest structure against it and runs the traced graph's flat
function: the same graph, the same results, and a few tens of microseconds of Python.

    hypergradient = km.hypergrad.compile_hypergradient(km.Implicit(linalg.neumann(5)), problem)
    for step in range(n):
        result = hypergradient(params, hparams, inner_batch, outer_batch)   # HypergradResult

Cost: one trace (and compile, with ``jit_compile=True``) per distinct signature of shapes,
dtypes and nest structure; then the estimator's own cost per call. The call runs the
inference function of the trace, so nothing is recorded on an enclosing `GradientTape`:
differentiate through an estimator by calling it inside your own function instead.
"""

import tensorflow as tf

from keras_metapt.hypergrad.problem import Estimator, StepBatches

__all__ = ["CompiledHypergradient", "compile_hypergradient"]


def _unwrap(batch):
    return (True, batch.batches) if isinstance(batch, StepBatches) else (False, batch)


def _as_tensor(x):
    return x if isinstance(x, tf.Tensor) else tf.convert_to_tensor(x)


class CompiledHypergradient:
    """``estimator(problem, ...)`` as a compiled callable with a small per-call cost.

    ``CompiledHypergradient(estimator, problem, *, jit_compile=False)``; call it as the
    estimator is called, less the problem:
    ``(params, hparams, inner_batch, outer_batch, *, opt_state=None, seed=None) ->
    HypergradResult``. Leaves that are not tensors (NumPy arrays, Python numbers) are
    converted to tensors on every call, so a new value never retraces; a new shape, dtype or
    nest structure traces once more (``num_traces`` counts them).
    """

    def __init__(self, estimator, problem, *, jit_compile=False):
        if not isinstance(estimator, Estimator):
            raise TypeError(f"estimator must be a keras_metapt estimator (an Estimator), got "
                            f"{estimator!r}")
        self.estimator = estimator
        self.problem = problem
        self._function = tf.function(self._body, jit_compile=bool(jit_compile))
        self._traces = {}  # leaf signature -> [(structure, atomic function, concrete)]

    @property
    def num_traces(self):
        return sum(len(entries) for entries in self._traces.values())

    def _body(self, arguments):
        params, hparams, (inner_steps, inner), (outer_steps, outer), opt_state, seed = arguments
        inner = StepBatches(inner) if inner_steps else inner
        outer = StepBatches(outer) if outer_steps else outer
        return self.estimator(self.problem, params, hparams, inner, outer, opt_state=opt_state,
                              seed=seed)

    def __call__(self, params, hparams, inner_batch, outer_batch, *, opt_state=None, seed=None):
        arguments = (params, hparams, _unwrap(inner_batch), _unwrap(outer_batch), opt_state,
                     seed)
        flat = tf.nest.flatten(arguments)
        leaves = [_as_tensor(x) for x in flat if not _is_constant(x)]
        # None and Python bool leaves are baked into the trace: their places and values are
        # part of the key (the StepBatches marks among them), the tensors' dtypes and shapes too.
        signature = (tuple((i, x) for i, x in enumerate(flat) if _is_constant(x)),
                     *((x.dtype, tuple(x.shape)) for x in leaves))
        entry = self._lookup(arguments, signature)
        if entry is None:
            entry = self._trace(arguments, signature)
        atomic, concrete = entry
        return concrete.function_type.pack_output(
            atomic.call_flat(*leaves, *concrete.captured_inputs))

    def _lookup(self, arguments, signature):
        for structure, atomic, concrete in self._traces.get(signature, ()):
            if _same_structure(arguments, structure):
                return atomic, concrete
        return None

    def _trace(self, arguments, signature):
        tensors = tf.nest.map_structure(
            lambda x: x if _is_constant(x) else _as_tensor(x), arguments)
        concrete = self._function.get_concrete_function(tensors)
        self._traces.setdefault(signature, []).append(
            (tf.nest.map_structure(lambda _: None, arguments), concrete.inference_fn, concrete))
        return concrete.inference_fn, concrete


def _is_constant(x):
    return x is None or isinstance(x, bool)


def _same_structure(arguments, structure):
    try:
        tf.nest.assert_same_structure(arguments, structure, check_types=True)
    except (ValueError, TypeError):
        return False
    return True


def compile_hypergradient(estimator, problem, *, jit_compile=False):
    """`CompiledHypergradient(estimator, problem, jit_compile=jit_compile)`."""
    return CompiledHypergradient(estimator, problem, jit_compile=jit_compile)
