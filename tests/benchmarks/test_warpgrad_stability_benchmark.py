"""`python -m benchmarks.warpgrad_stability --quick` stays runnable and reports what it stores.

References: each warp's singular values against the square roots of the eigenvalues of
K^T K (NumPy's symmetric eigensolver) of the final warp kernels stored in the JSON; rows
every --every meta-steps and at the last one; the table lists every row of the JSON."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.benchmarks.test_hvp_modes_benchmark import ROOT


def test_quick_warpgrad_stability_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.warpgrad_stability", "--quick",
                           "--warp_lrs=0.1,0.01", "--every=3", f"--report_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "warpgrad_stability.json"))
    assert set(result["runs"]) == {"0.1", "0.01"} and result["quick"]
    assert result["config"]["family"] == "digits" and "warp_lr" in result["config"]
    table = (tmp_path / "warpgrad_stability.md").read_text()
    for lr, run in result["runs"].items():
        assert [r["step"] for r in run["rows"]] == [3, 4]  # every 3, and the last (4)
        for row in run["rows"]:
            assert all(np.isfinite(row[k]) for k in ("support_loss", "warp_objective",
                                                     "distance"))
            assert f"| {lr} | {row['step']} | {row['support_loss']:.3f} |" in table
        last = run["rows"][-1]["singular_values"]
        assert len(last) == len(run["final_warps"]) >= 1
        for (largest, smallest), kernel in zip(last, run["final_warps"]):
            kernel = np.asarray(kernel, np.float64)
            matrix = kernel.reshape(-1, kernel.shape[-1])
            eigen = np.sqrt(np.clip(np.linalg.eigvalsh(matrix.T @ matrix), 0, None))
            assert largest == pytest.approx(eigen.max(), rel=1e-6)
            assert smallest == pytest.approx(eigen.min(), rel=1e-6, abs=1e-6)
    # the warps moved from the identity (singular values 1) at the larger step
    assert max(abs(a - 1) for a, _ in result["runs"]["0.1"]["rows"][-1]["singular_values"]) > 0
    assert (tmp_path / "warpgrad_stability.png").stat().st_size > 0
