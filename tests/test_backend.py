"""Importing keras_metapt under another Keras backend fails with a clear message."""

import os
import subprocess
import sys


def run_import(env_backend):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if env_backend is not None:
        env["KERAS_BACKEND"] = env_backend
    return subprocess.run([sys.executable, "-c", "import keras_metapt, keras; print(keras.backend.backend())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_other_backend_fails_clearly():
    proc = run_import("jax")
    assert proc.returncode != 0
    assert "KERAS_BACKEND='jax'" in proc.stderr and "TensorFlow backend" in proc.stderr


def test_default_backend_is_tensorflow():
    proc = run_import(None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("tensorflow")
