"""Every example runs in its ``--fast`` mode, with and without ApproxBP, and prints its numbers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "metric"),
    [
        ("text_classification.py", "val_acc="),
        ("image_classification.py", "val_acc="),
        ("causal_lm_lora.py", "val_ppl="),
    ],
)
def test_example_fast_mode_compares_both_runs(script: str, metric: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for run in ("baseline", "ApproxBP"):
        row = next(line for line in lines if line.startswith(f"run={run}"))
        value = float(row.split(metric)[1].split()[0])
        assert math.isfinite(value) and value >= 0, row
    memory = next(line for line in lines if line.startswith("saved-for-backward bytes per training step:"))
    before, after = (float(number) for number in re.findall(r"([\d.]+) MiB", memory))
    assert 0 < after < before, memory  # the converted run saves less for backward
