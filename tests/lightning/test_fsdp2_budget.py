"""ApproxBP(memory_budget=...) on a model built and sharded with ``fully_shard`` in ``configure_model``
(ModelParallelStrategy), two CPU processes over gloo: one plan on both ranks, the losses of the same
model trained without a budget, and an impossible budget as a clear error on every rank."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_approxbp import ApproxBP
from lightning_approxbp.memory import is_checkpointed
from tests.distributed import end_distributed_run, run_script
from tests.tolerances import IDENTICAL

ROOT = Path(__file__).resolve().parents[2]
BATCH, WIDTH, BLOCKS, STEPS = 64, 32, 4, 3


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
            for _ in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class LitSharded(LightningModule):
    """Builds the stack in ``configure_model`` and shards each block and the stack, as FSDP2 guides do."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: Stack | None = None
        self.losses: list[Tensor] = []

    def configure_model(self) -> None:
        if self.stack is not None:
            return
        torch.manual_seed(0)
        stack = Stack()
        mesh = self.device_mesh["data_parallel"]
        for block in stack.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(stack, mesh=mesh)
        self.stack = stack

    def on_train_start(self) -> None:
        self.losses.clear()  # the conversion's probe ran training_step too

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.stack(x), y)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(STEPS * BATCH, WIDTH, generator=g), torch.randn(STEPS * BATCH, 1, generator=g))
        return DataLoader(data, batch_size=BATCH)


class LitBuiltInInit(LitSharded):
    """Builds the stack in ``__init__`` (converted before ``configure_model``) and shards it there."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stack = Stack()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.stack.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.stack, mesh=mesh)


def _fit(budget: Any, devices: int = 2, model: LitSharded | None = None) -> dict[str, Any]:
    model, callback = model or LitSharded(), ApproxBP(memory_budget=budget)
    trainer = Trainer(
        accelerator="cpu", devices=devices, max_steps=STEPS, callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    plan = callback.memory_plan
    return {
        "rank": trainer.global_rank,
        "losses": [loss.item() for loss in model.losses],
        "blocks": plan.blocks,
        "checkpointed": [f"stack.blocks.{i}" for i, b in enumerate(model.stack.blocks) if is_checkpointed(b)],
        "before": plan.before.peak_bytes,
        "after": plan.after.peak_bytes,
        "parts": plan.before.parts,
        "phase": plan.before.phase,
        "one_fewer": plan.one_fewer_peak_bytes,
        "recompute_flops": plan.recompute_flops,
        "forward_flops": plan.forward_flops,
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "keys": list(model.state_dict()),
    }


def fit(out: str) -> None:
    """Every run in one two-process job (Lightning's launcher runs this script again as rank 1)."""
    results = {"none": _fit(2**40)}
    try:
        _fit(1)
    except ValueError as error:
        results["impossible"] = str(error)
    smallest = int(re.search(r"is [\d.]+ \w+ \((\d+) bytes\)", results["impossible"]).group(1))
    results["smallest"] = smallest
    results["budget"] = (results["none"]["before"] + smallest) // 2
    results["planned"] = _fit(results["budget"])
    # built in __init__: converted before configure_model, planned after it shards (per rank too)
    results["built_in_init"] = _fit(results["budget"], model=LitBuiltInInit())
    torch.save(results, os.path.join(out, f"rank{results['none']['rank']}.pt"))
    end_distributed_run()


def test_a_memory_budget_on_a_fully_sharded_model_plans_per_rank_and_trains_as_without(tmp_path: Path) -> None:
    script = tmp_path / "budget.py"  # Lightning's launcher starts rank 1 by running this file again
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.lightning.test_fsdp2_budget import fit; "
        f"fit({str(tmp_path)!r})"
    )
    run_script(script)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for results in ranks:
        none, planned = results["none"], results["planned"]
        assert none["sharded"] and planned["sharded"] and not none["blocks"]
        assert "cannot be met" in results["impossible"] and f"all {BLOCKS} blocks" in results["impossible"]
        assert "one rank of the model sharded with fully_shard over 2 ranks" in results["impossible"]
        assert results["smallest"] < results["budget"] < none["before"]
        assert 1 <= len(planned["blocks"]) < BLOCKS
        assert planned["after"] <= results["budget"] < planned["one_fewer"]
        assert sorted(planned["checkpointed"]) == sorted(planned["blocks"])  # applied on the real model
        # each block's forward FLOPs found though training_step calls the FSDP unit, not the LightningModule
        assert 0 < planned["recompute_flops"] < planned["forward_flops"]
        assert planned["keys"] == none["keys"]  # state-dict keys unchanged
        assert len(planned["losses"]) == STEPS
        torch.testing.assert_close(planned["losses"], none["losses"], **IDENTICAL)
        # the rank holds half of every parameter (padded), its gradients and AdamW state
        parameters = sum(p.numel() for p in Stack().parameters()) * 4
        assert none["parts"]["parameters"] <= parameters // 2 + 4 * 1024
        # the same sharded model, whichever hook built it: the same plan and training
        assert results["built_in_init"]["blocks"] == planned["blocks"] and results["built_in_init"]["sharded"]
        torch.testing.assert_close(results["built_in_init"]["losses"], none["losses"], **IDENTICAL)
    # one plan on both ranks
    assert ranks[0]["planned"]["blocks"] == ranks[1]["planned"]["blocks"]
    assert ranks[0]["impossible"] == ranks[1]["impossible"]
