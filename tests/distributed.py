"""Helpers for the tests that train in two CPU processes (Lightning's launcher, gloo).

Lightning starts rank 1 by running the test's script again and does not tear the process group
down at the end of ``fit``; a process that then exits with gloo's threads still alive can abort
("terminate called without an active exception"), and rank 0 can exit before rank 1 has written
its results. So every script ends with :func:`end_distributed_run`, after writing its results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
# Two processes of a few steps take about 20 s alone; a loaded 2-core machine can take several times that.
TIMEOUT_S = 600


def end_distributed_run() -> None:
    """Wait for every rank, then destroy the process group (its threads are joined before exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_script(script: Path, timeout: float = TIMEOUT_S) -> None:
    """Run a two-process training script (one thread per process); fail with its output's end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env, capture_output=True,
                                text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-3000:]
        pytest.fail(f"{script.name} timed out after {timeout:.0f} s; last output:\n{tail!r}")
    assert result.returncode == 0, f"{script.name} exited with {result.returncode}:\n{result.stderr[-4000:]}"
