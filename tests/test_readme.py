"""The README's API tour runs as written, and its test command is the one .ci/run runs."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    return open(os.path.join(ROOT, "README.md")).read()


def test_api_tour_runs():
    tour = readme().split("## API tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = float(proc.stdout.strip().split()[-1])
    assert 0.0 < loss < 10.0


def test_meta_pretrainer_example_runs(tmp_path):
    section = readme().split("## Meta-learning pre-training inside", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learned task weights" in proc.stdout
    assert (tmp_path / "runs" / "readme_example" / "task_weights.png").exists()
    assert (tmp_path / "runs" / "readme_example" / "ckpt" / "latest.json").exists()


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
    assert command in readme()
    assert ci.count(command) == 2  # declared once, run once verbatim
