"""Shared helpers for the benchmark scripts: the machine, its load and memory, timing, trainers, child processes."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def machine_name(device: torch.device) -> str:
    """Human-readable name of the device that produced the numbers."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo`` (``None`` where there is none: not Linux, or no such field)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def load_average(separator: str = " ") -> str:
    """The 1, 5 and 15-minute load averages as ``/proc/loadavg`` states them: how busy the machine was."""
    return separator.join(Path("/proc/loadavg").read_text().split()[:3])


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: peak) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux >= 4.0: ``VmHWM`` restarts from the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def machine_slug(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def median_time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA-synchronised on GPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(repeats, 20) * 5, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def quiet_trainer(**options: Any) -> Any:
    """A Lightning ``Trainer`` on one device that logs, checkpoints, shows and summarises nothing; ``options`` add."""
    from lightning.pytorch import Trainer

    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(devices=1, **quiet, **options)


@dataclass(frozen=True)
class ChildRun:
    """One command run in a fresh process: exit status, output, wall and CPU time, its own peak RSS."""

    returncode: int
    output: str
    wall_s: float
    cpu_s: float
    max_rss_bytes: int


def run_child(command: Sequence[str], cwd: Path | None = None, timeout_s: float | None = None) -> ChildRun:
    """Run ``command`` in a fresh process; measure its wall and CPU time and peak resident memory.

    The peak is the child's own ``rusage`` (``os.wait4``), so neither this process nor earlier
    children raise it (``RUSAGE_CHILDREN`` would report the largest child so far). A child still
    running after ``timeout_s`` is killed (return code -9).
    """
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nothing can block on a full pipe
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout_s, process.kill) if timeout_s else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall_s = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        log.seek(0)
        output = log.read()
    cpu_s = usage.ru_utime + usage.ru_stime
    return ChildRun(process.returncode, output, wall_s, cpu_s, usage.ru_maxrss * 1024)  # Linux: KiB
