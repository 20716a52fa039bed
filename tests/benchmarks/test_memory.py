"""`benchmarks.memory.peak_requested_mib` against tensor sizes known exactly: a call whose only
allocation is one 512 x 512 float32 output requests 1 MiB; a matmul of that size summed to a
scalar holds the 1 MiB product and a 4-byte scalar at once. Run in a fresh process, where the
BFC allocator (which emits the profiler's memory events on CPU) can still be chosen."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    import tensorflow as tf
    from benchmarks.memory import peak_requested_mib
    x = tf.ones([512, 512])
    out = {}
    for name, fn in [("scale", lambda a: a * 2.0),
                     ("matmul_sum", lambda a: tf.reduce_sum(tf.matmul(a, a)))]:
        f = tf.function(fn)
        f(x)  # traced and run once: the profiled call allocates only its own tensors
        peak, allocations, _ = peak_requested_mib(lambda: f(x).numpy())
        out[name] = [peak, allocations]
    print(json.dumps(out))
""")


def test_peak_requested_counts_the_bytes_of_live_tensors():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, allocations = out["scale"]
    assert peak == 1.0 and allocations == 1
    peak, allocations = out["matmul_sum"]
    assert peak == 1.0 + 4 / 2 ** 20 and allocations == 2
