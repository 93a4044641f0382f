"""Shared by the examples: command-line flags and the comparison table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_approxbp import ApproxBP, ApproxBPPrecision, PeakMemoryMonitor

SAVED = "peak_memory/saved_activation_bytes"
CUDA_PEAK = "peak_memory/train_allocated_bytes"


def parse_args(description: str) -> argparse.Namespace:
    """``--approxbp`` / ``--no-approxbp`` pick one run (default: both, compared); ``--fast`` for CI."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--approxbp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run only with (--approxbp) or only without (--no-approxbp) ApproxBP; default: both, compared",
    )
    parser.add_argument("--fast", action="store_true", help="a few batches only (CI smoke run)")
    return parser.parse_args()


def modes(args: argparse.Namespace) -> list[bool]:
    return [False, True] if args.approxbp is None else [args.approxbp]


def memory_setup(approxbp: bool) -> dict[str, Any]:
    """Trainer arguments of the two runs: ApproxBP callback + plugin, or Lightning's bf16-mixed."""
    if approxbp:
        return {"callbacks": [ApproxBP(), PeakMemoryMonitor()], "plugins": [ApproxBPPrecision("bf16-mixed")]}
    return {"callbacks": [PeakMemoryMonitor()], "precision": "bf16-mixed"}


def trainer_kwargs(fast: bool, max_epochs: int, name: str) -> dict[str, Any]:
    """Trainer settings shared by the examples; ``fast`` limits the run to a few batches.

    Metrics go to ``lightning_logs/<name>/version_N/metrics.csv`` under the current directory.
    """
    kwargs: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": "auto",
        "devices": 1,
        "logger": CSVLogger("lightning_logs", name=name),
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": not fast,
    }
    if fast:
        kwargs.update(max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0)
    return kwargs


def result_row(trainer: Trainer, approxbp: bool, metrics: tuple[str, ...]) -> dict[str, Any]:
    """What one run measured: saved-for-backward bytes, CUDA peak (on GPU) and the task metrics."""
    values = trainer.callback_metrics
    row: dict[str, Any] = {"run": "ApproxBP" if approxbp else "baseline", "saved MiB": float(values[SAVED]) / 2**20}
    if CUDA_PEAK in values:
        row["CUDA peak MiB"] = float(values[CUDA_PEAK]) / 2**20
    row.update({name: float(values[name]) for name in metrics})
    return row


def report(run: Callable[[bool], dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run each selected mode and print one line per run, plus the memory reduction when both ran."""
    rows = [run(approxbp) for approxbp in modes(args)]
    print()
    for row in rows:
        print("  ".join(f"{key}={_format(value)}" for key, value in row.items()))
    if len(rows) == 2:
        base, new = rows[0]["saved MiB"], rows[1]["saved MiB"]
        change = (new - base) / base
        print(f"saved-for-backward bytes per training step: {base:.2f} MiB -> {new:.2f} MiB ({change:+.1%})")
    return rows


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
