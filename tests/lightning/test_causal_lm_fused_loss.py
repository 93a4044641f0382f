"""The causal-LM recipe fits through the fused linear + cross-entropy by default, with the unfused loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lightning_approxbp import ApproxBP, ConversionConfig
from tests.tolerances import ROUNDING

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class _Watch(Callback):
    """Each training step's loss, and whether the LM returned logits in training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.logits_none: list[bool] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if module.training:
                self.logits_none.append(output.logits is None)

        # After the conversion (at setup): the causal LM inside the PEFT wrapper.
        pl_module.model.get_base_model().register_forward_hook(hook, with_kwargs=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(fused_loss: bool | str) -> tuple[ApproxBP, _Watch]:
    from lightning_approxbp.recipes import BBCNewsLMDataModule, LoRACausalLM

    seed_everything(0)
    model = LoRACausalLM(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, lora_rank=4)
    data = BBCNewsLMDataModule(max_length=16, batch_size=4, limit=40)
    approxbp, watch = ApproxBP(config=ConversionConfig(fused_loss=fused_loss)), _Watch()
    trainer = Trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                      precision="32-true", callbacks=[approxbp, watch], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return approxbp, watch


def test_the_recipe_trains_through_the_fused_loss_with_the_unfused_losses() -> None:
    fused, fused_watch = _fit("auto")
    unfused, unfused_watch = _fit(False)
    # The head's own row (the final norm's affine merged into it) and the loss's, kind: the causal LM.
    rows = [row for row in fused.report.rows if row.kind == "LlamaForCausalLM"]
    assert [(row.fqn, row.action) for row in rows] == [("model.base_model.model.lm_head", "converted")]
    assert "fused linear + cross-entropy" in rows[0].strategy and "uses the loss and not the logits" in rows[0].reason
    assert not any(row.kind == "LlamaForCausalLM" for row in unfused.report.rows)
    assert fused_watch.logits_none == [True] * 3 and unfused_watch.logits_none == [False] * 3
    # The same step for step (the other conversions are the same in both runs): fp32 rounding only.
    torch.testing.assert_close(torch.tensor(fused_watch.losses), torch.tensor(unfused_watch.losses),
                               **ROUNDING[torch.float32])
