r"""
Peak Memory Monitor
===================

Logs the peak memory of every training epoch: accelerator memory on CUDA, the bytes a training
step saves for backward (on every device) and the process's resident-memory high-water mark.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_approxbp.memory import CheckpointPlan
from lightning_approxbp.saved_tensors import SavedTensorCounter

try:
    import resource

    _RUSAGE_AVAILABLE = True
except ImportError:  # Windows
    _RUSAGE_AVAILABLE = False

PREFIX = "peak_memory"


class PeakMemoryMonitor(Callback):
    r"""Log the peak memory of each training epoch through the Trainer's loggers.

    Keys (logged once per training epoch, in bytes, max over ranks):

    - ``peak_memory/saved_activation_bytes``: the bytes a training step saves for backward,
      counted once per storage, parameters excluded (device independent; this is what the
      ApproxBP callback reduces). Measured with ``torch.autograd.graph.saved_tensors_hooks``
      from the start of a batch to its first backward, on the batches chosen by
      ``measure_every_n_batches``; the epoch's largest value is logged.
    - ``peak_memory/train_allocated_bytes``, ``peak_memory/train_reserved_bytes`` (CUDA only):
      ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` during the training part of
      the epoch (statistics reset at epoch start and around validation).
    - ``peak_memory/val_allocated_bytes``, ``peak_memory/val_reserved_bytes`` (CUDA only, when
      validation ran in the epoch): the same for the validation run inside the epoch.
    - ``peak_memory/predicted_peak_bytes`` (with an :class:`~lightning_approxbp.ApproxBP` callback
      given a ``memory_budget``): the step peak its plan predicted (simulated on fake tensors),
      to read beside the measured ``train_allocated_bytes`` on CUDA.
    - ``peak_memory/host_rss_bytes`` (where ``resource.getrusage`` exists: Linux, macOS): the
      process's resident-set high-water mark so far.

    The values also appear in the progress bar (``prog_bar``). Without a logger the callback
    warns once and still records the values in ``trainer.callback_metrics``.

    Cost: outside the measured batches nothing runs per step. On a measured batch the hook
    records one storage key per saved tensor and keeps no tensor alive.

    Args:
        measure_every_n_batches: measure the saved bytes of every n-th training batch of an
            epoch (batch 0, n, 2n, ...). Default ``None``: only the first batch of each epoch.
        prog_bar: also show the values in the progress bar.

    Raises:
        MisconfigurationException: if ``measure_every_n_batches`` is not a positive integer.

    Example::

        from lightning.pytorch import Trainer
        from lightning_approxbp.callbacks.peak_memory import PeakMemoryMonitor

        trainer = Trainer(callbacks=[PeakMemoryMonitor()])
        trainer.fit(model)
        trainer.callback_metrics["peak_memory/saved_activation_bytes"]
    """

    def __init__(self, measure_every_n_batches: int | None = None, prog_bar: bool = True) -> None:
        if measure_every_n_batches is not None and (
            not isinstance(measure_every_n_batches, int) or measure_every_n_batches < 1
        ):
            raise MisconfigurationException(
                f"PeakMemoryMonitor(measure_every_n_batches={measure_every_n_batches!r}): expected a positive "
                "integer, or None to measure only the first batch of each epoch."
            )
        self.measure_every_n_batches = measure_every_n_batches
        self.prog_bar = prog_bar
        self._counter: SavedTensorCounter | None = None
        self._peaks: dict[str, int] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._warn_without_logger(trainer, stage)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_epoch(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start_counting(pl_module, batch_idx)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._stop_counting()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_counting()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_cuda_phase(trainer, finished="train")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_cuda_phase(trainer, finished="val")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_counting()

    def _warn_without_logger(self, trainer: Trainer, stage: str) -> None:
        if stage == TrainerFn.FITTING and not trainer.loggers:
            rank_zero_warn(
                "PeakMemoryMonitor: the Trainer has no logger, so the peak-memory values are only kept in "
                "`trainer.callback_metrics` (and the progress bar). Pass `Trainer(logger=...)` to record them."
            )

    def _start_epoch(self, trainer: Trainer) -> None:
        self._peaks = {}
        if _on_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def _start_counting(self, pl_module: LightningModule, batch_idx: int) -> None:
        every = self.measure_every_n_batches
        due = batch_idx == 0 if every is None else batch_idx % every == 0
        if not due or self._counter is not None:
            return
        self._counter = SavedTensorCounter(exclude=pl_module.parameters())
        self._counter.__enter__()

    def _stop_counting(self) -> None:
        counter, self._counter = self._counter, None
        if counter is None:
            return
        counter.__exit__(None, None, None)
        self._record("saved_activation_bytes", counter.stats.activation_bytes)

    def _switch_cuda_phase(self, trainer: Trainer, finished: str) -> None:
        """Fold the CUDA peak of the phase that just finished into its keys and reset the statistics."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not _on_cuda(trainer):
            return
        device = trainer.strategy.root_device
        self._record(f"{finished}_allocated_bytes", torch.cuda.max_memory_allocated(device))
        self._record(f"{finished}_reserved_bytes", torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)

    def _record(self, name: str, value: int) -> None:
        self._peaks[name] = max(self._peaks.get(name, 0), int(value))

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_cuda_phase(trainer, finished="train")
        host_rss = _host_rss_peak_bytes()
        if host_rss is not None:
            self._record("host_rss_bytes", host_rss)
        predicted = _predicted_peak_bytes(trainer)
        if predicted is not None:
            self._record("predicted_peak_bytes", predicted)
        # float64 keeps byte counts exact past 2**24 (MPS has no float64).
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        for name, value in sorted(self._peaks.items()):
            pl_module.log(
                f"{PREFIX}/{name}",
                torch.tensor(value, dtype=dtype, device=pl_module.device),
                on_step=False,
                on_epoch=True,
                prog_bar=self.prog_bar,
                sync_dist=True,
                reduce_fx="max",
            )


def _predicted_peak_bytes(trainer: Trainer) -> int | None:
    """The step peak that an ApproxBP memory-budget plan predicted, if one was made."""
    plans = [getattr(callback, "memory_plan", None) for callback in trainer.callbacks]
    peaks = [plan.after.peak_bytes for plan in plans if isinstance(plan, CheckpointPlan)]
    return max(peaks) if peaks else None


def _on_cuda(trainer: Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"


def _host_rss_peak_bytes() -> int | None:
    """The process's resident-set high-water mark in bytes, or ``None`` where the OS does not report it."""
    if not _RUSAGE_AVAILABLE:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
