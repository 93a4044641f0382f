"""Lightning's large-model pattern with ``ApproxBP()``: ``configure_model`` builds a tiny Llama (real,
``init_module(empty_init=True)``, with activation checkpointing) and ``fully_shard`` s it; two CPU
processes over gloo. Each run must train exactly as the one where the user calls ``convert`` by
hand before ``fully_shard``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_approxbp import ApproxBP, convert
from lightning_approxbp.conversion.gated_mlp import FusedGatedMLP
from lightning_approxbp.plugins import ApproxBPPrecision
from tests.distributed import end_distributed_run, run_script

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96,
)
RUNS = {  # name: (how configure_model builds, checkpointed blocks, ApproxBP callback)
    "by_hand": ("convert_first", False, False),
    "real": ("real", False, True),
    "empty_init": ("empty_init", False, True),
    "checkpointed": ("real", True, True),
}


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def _ids(batch: int = 2) -> Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(1))


class LitLlama(LightningModule):
    """Builds and shards in ``configure_model`` as Lightning's FSDP2 guide does; loads weights after
    materialisation when built empty."""

    def __init__(self, build: str, checkpointed: bool, weights: str) -> None:
        super().__init__()
        self.build, self.checkpointed, self.weights = build, checkpointed, weights
        self.llama: LlamaForCausalLM | None = None
        self.losses: list[Tensor] = []

    def configure_model(self) -> None:
        if self.llama is not None:
            return
        if self.build == "empty_init":
            with self.trainer.init_module(empty_init=True):
                llama = LlamaForCausalLM(CONFIG)
        else:
            llama = _llama()
        if self.build == "convert_first":
            convert(llama, _ids())
        mesh = self.device_mesh["data_parallel"]
        for index, layer in enumerate(llama.model.layers):
            if self.checkpointed:
                layer = llama.model.layers[index] = checkpoint_wrapper(layer)
            fully_shard(layer, mesh=mesh)
        fully_shard(llama, mesh=mesh)
        self.llama = llama

    def on_fit_start(self) -> None:
        if self.build == "empty_init":
            weights = torch.load(self.weights)
            set_model_state_dict(self.llama, weights, options=StateDictOptions(full_state_dict=True))
            rotary = self.llama.model.rotary_emb  # non-persistent buffers: not in any state dict
            inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
            rotary.inv_freq.copy_(inv_freq)
            rotary.original_inv_freq.copy_(inv_freq)

    def on_train_start(self) -> None:
        self.losses.clear()  # the conversion's probe ran training_step too

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        loss = self.llama(ids, labels=ids).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(_ids(4 * STEPS)), batch_size=2)


def fit(out: str) -> None:
    """Every run in one two-process job (Lightning's launcher runs this script again as rank 1)."""
    results: dict[str, Any] = {}
    for name, (build, checkpointed, with_callback) in RUNS.items():
        model, callback = LitLlama(build, checkpointed, os.path.join(out, "weights.pt")), ApproxBP()
        trainer = Trainer(
            accelerator="cpu", devices=2, max_steps=STEPS, plugins=[ApproxBPPrecision("bf16-mixed")],
            callbacks=[callback] if with_callback else [],
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model)
        layer = model.llama.model.layers[0]
        results[name] = {
            "losses": [loss.item() for loss in model.losses],
            "fused": isinstance(getattr(layer, "_checkpoint_wrapped_module", layer).mlp, FusedGatedMLP),
            "converted": None if callback.report is None else len(callback.report.converted),
        }
    torch.save(results, os.path.join(out, f"rank{trainer.global_rank}.pt"))
    end_distributed_run()


def test_configure_model_built_and_sharded_models_train_as_converted_by_hand(tmp_path: Path) -> None:
    torch.save(_llama().state_dict(), tmp_path / "weights.pt")
    script = tmp_path / "configure_model.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.lightning.test_configure_model import fit; "
        f"fit({str(tmp_path)!r})"
    )
    run_script(script)
    results = torch.load(tmp_path / "rank0.pt")
    expected = results["by_hand"]["losses"]
    assert len(expected) == STEPS and results["by_hand"]["converted"] is None
    for name in ("real", "empty_init", "checkpointed"):
        assert results[name]["fused"] and results[name]["converted"] == 18, name
        torch.testing.assert_close(results[name]["losses"], expected, rtol=1e-5, atol=0, msg=name)
