"""The ApproxBP callback next to the Lightning callbacks and Trainer options fine-tuning relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
    ThroughputMonitor,
)
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approxbp import ApproxBP
from lightning_approxbp.plugins import ApproxBPPrecision
from tests.callbacks.test_approxbp import LitLM, _converted, _ids, _llama, _trainer
from tests.lightning.test_precision import _RecordBackbone
from tests.tolerances import ROUNDING

PROBE = "training_step on 2 of 4 samples of the first train batch"


class LitLMBuiltInSetup(LitLM):
    """The tiny LLaMA built in ``setup``, with a learning-rate schedule; 4 batches of 4."""

    def _build(self) -> nn.Module | None:
        return None

    def setup(self, stage: str) -> None:
        if self.model is None:
            self.model = _llama()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(_ids(16)), batch_size=4)


def test_model_checkpoint_and_learning_rate_monitor(tmp_path: Path) -> None:
    callback, model = ApproxBP(), LitLMBuiltInSetup()
    checkpoint, monitor = ModelCheckpoint(dirpath=tmp_path, save_last=True), LearningRateMonitor("step")
    trainer = _trainer(
        [callback, checkpoint, monitor], plugins=[ApproxBPPrecision("bf16-mixed")], max_steps=-1, max_epochs=1,
        enable_checkpointing=True, logger=CSVLogger(tmp_path), log_every_n_steps=1,
    )
    trainer.fit(model)
    assert _converted(model) and callback.report.probe == PROBE
    assert monitor.lrs["lr-SGD"] == pytest.approx([0.1, 0.01, 0.001, 0.0001])
    plain = LitLMBuiltInSetup()
    plain.setup("fit")
    plain.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"], strict=True)
    assert not _converted(plain)


def _fit(callbacks: list, **kwargs: Any) -> LightningModule:
    model = LitLMBuiltInSetup()
    _trainer(callbacks, **{"max_steps": 2, **kwargs}).fit(model)
    return model


@pytest.mark.parametrize("option", [{"accumulate_grad_batches": 2}, {"gradient_clip_val": 1.0}])
def test_accumulation_and_clipping_train_as_without_approxbp(option: dict[str, Any]) -> None:
    callback = ApproxBP()
    assert _converted(_fit([callback], plugins=[ApproxBPPrecision("bf16-mixed")], **option))
    assert callback.report.probe == PROBE

    # without activation steps the conversion is exact: the same training, up to fp32 rounding
    exact, reference = ApproxBP(activations=False), _fit([], **option)
    converted = _fit([exact], **option)
    assert _converted(converted) and exact.report.converted
    for (name, actual), expected in zip(converted.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, **ROUNDING[torch.float32], msg=name)
    # the option must shape this training for the comparison to cover it
    plain = _fit([])
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), plain.parameters(), strict=True))


def test_throughput_monitor_sees_the_plugins_compute_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import throughput_monitor

    dtypes: list[torch.dtype] = []
    monkeypatch.setattr(throughput_monitor, "get_available_flops", lambda device, dtype: dtypes.append(dtype))
    model = LitLMBuiltInSetup()
    model.flops_per_batch = 1_000_000  # what the monitor turns into FLOPs/s
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0), window_size=2)
    _trainer(
        [ApproxBP(), monitor], plugins=[ApproxBPPrecision("bf16-mixed")], max_steps=-1, max_epochs=1,
        logger=CSVLogger(tmp_path), log_every_n_steps=1,
    ).fit(model)
    assert dtypes == [torch.bfloat16]  # as with Trainer(precision="bf16-mixed"); float32 before the plugin was one
    header = next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).read_text().splitlines()[0]
    assert {"train/device/samples_per_sec", "train/device/flops_per_sec"} <= set(header.split(","))
    assert _converted(model)


def _swa() -> StochasticWeightAveraging:
    return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)


def test_stochastic_weight_averaging() -> None:
    epochs = {"max_steps": -1, "max_epochs": 2}
    callback = ApproxBP()
    assert _converted(_fit([callback, _swa()], plugins=[ApproxBPPrecision("bf16-mixed")], **epochs))
    assert callback.report.probe == PROBE

    # SWA averages copies of the converted model: exact conversion, the same averaged weights
    exact, reference = ApproxBP(activations=False), _fit([_swa()], **epochs)
    converted = _fit([exact, _swa()], **epochs)
    assert _converted(converted)
    for (name, actual), expected in zip(converted.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, **ROUNDING[torch.float32], msg=name)
    plain = _fit([], **epochs)
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), plain.parameters(), strict=True))


class LitLMWithBackbone(LitLM):
    """The decoder stack as ``backbone`` (a property: one module, one name); 2 batches per epoch."""

    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_backbone_finetuning_unfreezes_into_fp32_master_weights() -> None:
    callback, recorder, model = ApproxBP(), _RecordBackbone(), LitLMWithBackbone()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer = _trainer(
        [callback, finetuning, recorder], plugins=[ApproxBPPrecision("bf16-mixed")], max_steps=-1, max_epochs=2,
    )
    trainer.fit(model)
    assert _converted(model) and callback.report.converted
    frozen, unfrozen = ([step for step in recorder.steps if (step[0] > 0) == later] for later in (False, True))
    assert all(torch.bfloat16 in dtypes and not grads for _, dtypes, grads, _ in frozen)  # linears stored in bf16
    assert unfrozen and all(dtypes == grads == {torch.float32} for _, dtypes, grads, _ in unfrozen)
    assert all(not torch.equal(p, recorder.at_unfreeze[n]) for n, p in model.backbone.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # teardown
