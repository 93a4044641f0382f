"""Lightning's large-model pattern with ``ApproxBP()``: ``configure_model`` builds a tiny Llama (real,
``init_module(empty_init=True)``, with activation checkpointing) and ``fully_shard`` s it; two CPU
processes over gloo. Each run must train exactly as the one where the user calls ``convert`` by
hand before ``fully_shard``, and a distributed checkpoint saved with ApproxBP must load exactly into
the converted and the unconverted model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
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
from tests.tolerances import IDENTICAL, LOSS_CURVE_FP32

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96,
)


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


def _full_parameters(model: LightningModule) -> dict[str, Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.llama.named_parameters()}


class _RecordLoaded(Callback):
    """The full parameters when training starts (after any checkpoint was loaded)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.parameters = _full_parameters(pl_module)


def _fit(out: str, build: str, steps: int, approxbp: bool, checkpointed: bool = False, resume: bool = False) -> dict:
    model, callback, loaded = LitLlama(build, checkpointed, os.path.join(out, "weights.pt")), ApproxBP(), _RecordLoaded()
    trainer = Trainer(
        accelerator="cpu", devices=2, max_steps=steps, plugins=[ApproxBPPrecision("bf16-mixed")],
        callbacks=[callback, loaded] if approxbp else [loaded],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=os.path.join(out, "checkpoint") if resume else None)
    layer = model.llama.model.layers[0]
    return {
        "trainer": trainer,
        "losses": [loss.item() for loss in model.losses],
        "fused": isinstance(getattr(layer, "_checkpoint_wrapped_module", layer).mlp, FusedGatedMLP),
        "converted": None if callback.report is None else len(callback.report.converted),
        "loss_row": None if callback.report is None else " ".join(
            row.reason for row in callback.report.rows if row.fqn == "llama.lm_head" and row.action == "skipped"
        ),
        "loaded": loaded.parameters,
        "final": _full_parameters(model),
    }


def fit(out: str) -> None:
    """Every run in one two-process job (Lightning's launcher runs this script again as rank 1)."""
    results = {
        "by_hand": _fit(out, "convert_first", STEPS, approxbp=False),
        "real": _fit(out, "real", STEPS, approxbp=True),
        "empty_init": _fit(out, "empty_init", STEPS, approxbp=True),
        "checkpointed": _fit(out, "real", STEPS, approxbp=True, checkpointed=True),
    }
    # a distributed checkpoint saved with ApproxBP, at an epoch's end
    results["real"]["trainer"].save_checkpoint(os.path.join(out, "checkpoint"))
    results["resumed"] = _fit(out, "real", 2 * STEPS, approxbp=True, resume=True)
    results["resumed_by_hand"] = _fit(out, "convert_first", 2 * STEPS, approxbp=False, resume=True)
    results["resumed_unconverted"] = _fit(out, "real", 2 * STEPS, approxbp=False, resume=True)
    rank = results["real"]["trainer"].global_rank
    for result in results.values():
        del result["trainer"]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
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
        assert "loss not fused: the model has no values here" in results[name]["loss_row"], name
        torch.testing.assert_close(results[name]["losses"][:STEPS], expected, **LOSS_CURVE_FP32, msg=name)
    # The checkpoint loads exactly into the converted and the unconverted model, and resuming with
    # ApproxBP trains as resuming a model converted by hand. (Not compared with an uninterrupted run:
    # on this CPU setup a resumed run departs from it at its second step with or without ApproxBP.)
    saved = results["real"]["final"]
    for name in ("resumed", "resumed_by_hand", "resumed_unconverted"):
        assert list(results[name]["loaded"]) == list(saved)
        for parameter, value in saved.items():
            torch.testing.assert_close(results[name]["loaded"][parameter], value, **IDENTICAL, msg=parameter)
    assert not results["resumed_unconverted"]["fused"] and len(results["resumed_unconverted"]["losses"]) == STEPS
    torch.testing.assert_close(results["resumed"]["losses"], results["resumed_by_hand"]["losses"], **LOSS_CURVE_FP32)
