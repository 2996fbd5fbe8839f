"""``benchmarks/gpu_check.py --quick`` runs every section on the CPU and prints a figure for each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_quick_runs_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    checks = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert checks == [
        "exact kNN (k=15, all vs all)",
        "clustering, data sizes 2/5/3/1",
        "transformers engine, batch 2",
        "GRPO step (TRL, format reward)",
    ], proc.stdout
    assert all(" | cpu | " in r and "FAILED" not in r for r in rows)
    assert "tokens/s" in rows[2] and "ARI" in rows[1]
    assert "failed: none" in proc.stdout
