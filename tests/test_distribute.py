"""keras_metapt.distribute and data-parallel meta-PT.

References: the single-device run on the same global batches (phi must agree to float32
round-off), and the while-loop forms of the solvers for their Python-traced forms.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_metapt as km
from keras_metapt import linalg
from tests import distributed_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # 3 warm-up steps, then 5 hypersteps


def _run(args, timeout, env=None):
    return subprocess.run([sys.executable, "-m", "tests.distributed_toy", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("k, terms, solver, pt_batch, ft_batch", [
    (1, 1, "neumann", 64, 32),  # equal shards
    (2, 3, "cg", 63, 31),       # unequal shards (32 + 31, 16 + 15, 63 + 62)
])
def test_mirrored_two_devices_give_the_single_device_phi(tmp_path, k, terms, solver, pt_batch,
                                                          ft_batch):
    proc = _run(["mirrored", str(tmp_path), str(STEPS), str(k), str(terms), solver,
                 str(pt_batch), str(ft_batch)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = np.load(tmp_path / "phi_single.npy")
    mirrored = np.load(tmp_path / "phi_mirrored.npy")
    initial = np.zeros_like(single)  # TaskWeights logits start at 0
    assert np.abs(single - initial).max() > 1e-3  # the hypersteps moved phi
    np.testing.assert_allclose(mirrored, single, rtol=0, atol=1e-6)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multiworker_two_processes_give_the_single_process_phi(tmp_path):
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    try:
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.distributed_toy", "multiworker", str(tmp_path),
                 str(STEPS)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True))
        errors = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    tf.config.experimental.enable_op_determinism()
    single = distributed_toy.build_and_fit(tf.distribute.get_strategy(), STEPS).meta_parameters()[0]
    for index in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"phi_{index}.npy"), single, rtol=0,
                                   atol=1e-6)


def test_get_strategy_names_bad_input(monkeypatch):
    assert km.distribute.get_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="'gpu'"):
        km.distribute.get_strategy("gpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        km.distribute.get_strategy("multiworker")


def test_replica_sum_and_shard_fraction_with_one_replica():
    tree = {"a": tf.constant([1.0, 2.0]), "b": None}
    assert km.distribute.replica_sum(tree) is tree
    assert float(km.distribute.shard_fraction(tf.zeros([5, 3]))) == 1.0
    assert km.distribute.num_replicas() == 1


def _spd_problem(seed=0, n=6):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    h = tf.constant(a @ a.T / n + 0.5 * np.eye(n))
    b = (tf.constant(rng.normal(size=n)),)
    return (lambda v: (tf.linalg.matvec(h, v[0]),)), b


def test_python_traced_neumann_equals_while_loop():
    hvp_fn, b = _spd_problem()
    loop = linalg.neumann_inverse_hvp(hvp_fn, b, 0.1, 7)
    traced = linalg.neumann_inverse_hvp(hvp_fn, b, 0.1, 7, unroll=True)
    np.testing.assert_allclose(traced[0].numpy(), loop[0].numpy(), rtol=1e-14)


@pytest.mark.parametrize("iterations", [3, 30])  # 30: converges early, masked iterations
def test_python_traced_conjugate_gradient_equals_while_loop(iterations):
    hvp_fn, b = _spd_problem()
    x_loop, k_loop = linalg.conjugate_gradient_with_info(hvp_fn, b, iterations, 1e-12)
    x_traced, k_traced = linalg.conjugate_gradient_with_info(hvp_fn, b, iterations, 1e-12,
                                                             unroll=True)
    assert int(k_traced) == int(k_loop)
    np.testing.assert_allclose(x_traced[0].numpy(), x_loop[0].numpy(), rtol=1e-12)


def test_every_estimator_on_two_devices_gives_the_single_device_hypergradient(tmp_path):
    """Float64 ridge with a learned penalty; the global batch of 9 split 5 + 4 (unequal shards).
    Reference: the same estimator on one device on the global batch."""
    proc = _run(["estimators", str(tmp_path), "0"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = np.load(tmp_path / "estimators.npz")
    names = [k[:-len("_single")] for k in results.files if k.endswith("_single")]
    assert sorted(names) == ["evograd", "implicit_cg", "implicit_neumann", "sama", "sama_adam",
                             "unrolled", "unrolled_truncated"]
    for name in names:
        single = results[f"{name}_single"]
        assert abs(float(single)) > 1e-3, name
        for replica_value in results[f"{name}_mirrored"]:  # identical on both replicas
            np.testing.assert_allclose(replica_value, single, rtol=1e-10, err_msg=name)
    assert int(results["forward_refused"]) == 1


def test_non_finite_hypergradient_on_two_devices_stops_fit_and_keeps_phi(tmp_path):
    """A NaN FT loss under MirroredStrategy (2 logical devices), warm-up 1, 4 steps: the 3
    hypersteps are skipped in the cross-replica context (phi stays at its initial 0), each is
    counted once (not once per replica), and fit stops with NonFiniteHypergradientError."""
    proc = _run(["nonfinite", str(tmp_path), "0"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = np.load(tmp_path / "nonfinite.npz")
    np.testing.assert_array_equal(result["phi"], 0.0)
    assert str(result["outcome"]).startswith("3 hyperstep(s) produced a non-finite hypergradient")


def test_float16_overflow_skips_agree_on_two_devices(tmp_path):
    """mixed_float16 from a hyper loss scale of 2^60 on one device and under MirroredStrategy
    (2 logical devices), 60 steps (57 hypersteps): the same overflowing hypersteps are skipped
    on both (same final scale, same number of hyper-optimizer steps); phi agrees to float16
    rounding of the differently split batches (measured: max difference 1.4e-3 on |phi| up to
    0.073, correlation 0.99992)."""
    proc = _run(["float16", str(tmp_path), "60"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, mirrored = (np.load(tmp_path / f"float16_{name}.npz") for name in ("single", "mirrored"))
    assert float(single["scale"]) == float(mirrored["scale"]) < 2.0 ** 60
    assert int(single["hyper_steps"]) == int(mirrored["hyper_steps"]) > 0
    assert np.abs(single["phi"]).max() > 1e-2  # the applied hypersteps moved phi
    np.testing.assert_allclose(mirrored["phi"], single["phi"], atol=5e-3)
    assert np.corrcoef(single["phi"], mirrored["phi"])[0, 1] > 0.999


def test_float16_pt_overflow_on_one_replica_is_skipped_on_every_replica(tmp_path):
    """An Inf in the second replica's half of the first PT batch (mixed_float16, 2 logical
    devices): the PT step is skipped everywhere (weights finite, no optimizer step, the loss
    scale halved). Keras' LossScaleOptimizer alone checks the first replica's gradients only
    and wrote Inf into the weights."""
    proc = _run(["float16_shard_overflow", str(tmp_path), "0"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = np.load(tmp_path / "shard_overflow.npz")
    assert bool(result["finite"])
    assert int(result["iterations"]) == 0 and float(result["scale"]) == 2.0 ** 14
