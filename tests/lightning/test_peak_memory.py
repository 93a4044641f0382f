"""PeakMemoryMonitor: keys reach the loggers and the progress bar, no-logger warning, cost."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_approxbp.callbacks import peak_memory
from lightning_approxbp.callbacks.peak_memory import PeakMemoryMonitor

SAVED = "peak_memory/saved_activation_bytes"
RSS = "peak_memory/host_rss_bytes"


def _trainer(tmp_path: Path, monitor: PeakMemoryMonitor, **kwargs: object) -> Trainer:
    defaults: dict = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "max_epochs": 2,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "callbacks": [monitor],
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
    }
    return Trainer(**{**defaults, **kwargs})


def test_logs_keys_per_epoch_to_csv_and_progress_bar(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, PeakMemoryMonitor(), logger=CSVLogger(tmp_path))
    trainer.fit(BoringModel())
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    epochs = [row for row in rows if row[SAVED]]
    assert [row["epoch"] for row in epochs] == ["0", "1"]
    # BoringModel: Linear(32, 2) on a batch of 1 saves its input (128 B); mse_loss saves preds and target (8 B each).
    assert all(float(row[SAVED]) == 144 for row in epochs)
    assert all(float(row[RSS]) > 10 * 2**20 for row in epochs)
    assert set(trainer.progress_bar_metrics) >= {SAVED, RSS}
    assert not any(key.startswith("peak_memory/train_") for key in trainer.callback_metrics)  # CUDA only


def test_prog_bar_can_be_turned_off(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, PeakMemoryMonitor(prog_bar=False), logger=False, max_epochs=1)
    trainer.fit(BoringModel())
    assert SAVED in trainer.callback_metrics
    assert SAVED not in trainer.progress_bar_metrics


def test_warns_without_logger_and_still_records(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, PeakMemoryMonitor(), logger=False, max_epochs=1)
    with pytest.warns(UserWarning, match="has no logger"):
        trainer.fit(BoringModel())
    assert trainer.callback_metrics[SAVED] == 144


@pytest.mark.parametrize(("every", "measured"), [(None, [0, 0]), (2, [0, 2, 0, 2])])
def test_measures_only_the_chosen_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int | None, measured: list[int]
) -> None:
    calls: list[int] = []
    original = PeakMemoryMonitor._start_counting

    def spy(self: PeakMemoryMonitor, pl_module: object, batch_idx: int) -> None:
        before = self._counter
        original(self, pl_module, batch_idx)
        if self._counter is not before:
            calls.append(batch_idx)

    monkeypatch.setattr(PeakMemoryMonitor, "_start_counting", spy)
    _trainer(tmp_path, PeakMemoryMonitor(measure_every_n_batches=every), logger=False).fit(BoringModel())
    assert calls == measured


def test_parameters_are_not_counted(tmp_path: Path) -> None:
    class FrozenInput(BoringModel):
        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return (self.layer.weight * self.layer.weight).sum()  # mul saves the weight (a parameter) twice

    trainer = _trainer(tmp_path, PeakMemoryMonitor(), logger=False, max_epochs=1)
    trainer.fit(FrozenInput())
    assert trainer.callback_metrics[SAVED] == 0


def test_rejects_bad_interval() -> None:
    with pytest.raises(MisconfigurationException, match="positive integer"):
        PeakMemoryMonitor(measure_every_n_batches=0)


def test_host_rss_is_reported_in_bytes() -> None:
    assert peak_memory._host_rss_peak_bytes() > 10 * 2**20


@pytest.mark.gpu
def test_cuda_keys_for_train_and_validation(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, PeakMemoryMonitor(), accelerator="cuda", devices=1, logger=CSVLogger(tmp_path))
    trainer.fit(BoringModel())
    keys = {f"peak_memory/{phase}_{kind}_bytes" for phase in ("train", "val") for kind in ("allocated", "reserved")}
    assert keys <= set(trainer.callback_metrics)
    assert all(trainer.callback_metrics[key] > 0 for key in keys)
