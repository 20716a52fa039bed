"""Tests of the apps. `run_pytest_file` runs an app's in-process checks in their own
process: importing an app defines its absl flags, which would clash with other modules'
flags in the test process."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_pytest_file(name, expected_passed, timeout=900):
    """Runs tests/apps/``name`` with pytest in one fresh process (no xdist workers) and
    asserts that it exits 0 having passed ``expected_passed`` tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                           "-p", "no:cacheprovider", os.path.join("tests", "apps", name)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(rf"\b{expected_passed} passed\b", proc.stdout), proc.stdout[-3000:]
