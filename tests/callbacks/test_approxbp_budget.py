"""ApproxBP(memory_budget=...): the planned blocks are checkpointed after conversion, in a real Trainer."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approxbp import ApproxBP, PeakMemoryMonitor
from lightning_approxbp.memory import (
    OffloadCost,
    StepSimulation,
    blocks_of,
    is_checkpointed,
    is_offloaded,
)

pytestmark = pytest.mark.filterwarnings("ignore:Module is None", "ignore:.*does not have many workers")

BATCH, WIDTH = 64, 32


class Stack(LightningModule):
    """Four pre-LN MLP blocks; the step's activations dominate its peak at batch 64."""

    def __init__(self, example: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
            for _ in range(4)
        )
        if example:
            self.example_input_array = torch.randn(BATCH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        loss = self(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(2 * BATCH, WIDTH)), batch_size=BATCH)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _fit(callback: ApproxBP, module: Stack) -> None:
    trainer = Trainer(callbacks=[callback], max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)


def _peaks(module: Stack, example: bool) -> tuple[int, int]:
    """Simulated peaks with no block and with every block checkpointed, for the step the callback simulates:
    the configured SGD; training_step on a train batch, else forward and the output's mean."""
    batch = torch.randn(BATCH, WIDTH)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    step = None if example else (lambda m, b: m(b).pow(2).mean())
    simulation = StepSimulation(module, batch, optimizer=sgd, convert=True, step=step)
    names = tuple(name for name, _ in blocks_of(module))
    return simulation.measure().peak_bytes, simulation.measure(names).peak_bytes


@pytest.mark.parametrize("example", [False, True], ids=["train-batch", "example_input_array"])
def test_the_budget_plan_is_applied_after_conversion(example: bool):
    module = Stack(example)
    none, every = _peaks(Stack(), example)
    callback = ApproxBP(memory_budget=(none + every) // 2)
    _fit(callback, module)
    plan = callback.memory_plan
    assert plan is not None and 0 < len(plan.blocks) < 4
    assert plan.before.peak_bytes == none  # the converted model, the configured SGD
    assert plan.after.peak_bytes <= (none + every) // 2 < plan.one_fewer_peak_bytes
    assert sorted(plan.blocks) == [name for name, m in blocks_of(module) if is_checkpointed(m)]
    assert callback.report is not None and callback.report.converted


def test_the_peak_memory_monitor_logs_the_predicted_peak_of_the_plan():
    none, every = _peaks(Stack(), example=False)
    callback, monitor = ApproxBP(memory_budget=(none + every) // 2), PeakMemoryMonitor()
    trainer = Trainer(callbacks=[callback, monitor], max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Stack())
    predicted = trainer.callback_metrics["peak_memory/predicted_peak_bytes"]
    assert int(predicted) == callback.memory_plan.after.peak_bytes


def test_an_impossible_budget_fails_the_fit_with_the_smallest_peak():
    with pytest.raises(ValueError, match="cannot be met: the smallest simulated peak, with all 4 blocks"):
        _fit(ApproxBP(memory_budget="1KiB"), Stack())


@pytest.mark.parametrize("budget", [-1, "lots", 2.0])
def test_a_bad_budget_is_refused_at_construction(budget):
    with pytest.raises(ValueError, match="memory_budget|memory budget"):
        ApproxBP(memory_budget=budget)


def test_offload_needs_a_budget():
    with pytest.raises(ValueError, match="give `memory_budget` with it"):
        ApproxBP(offload=True)


def test_offload_is_not_considered_when_training_on_the_cpu():
    """Even when modelled as free: on the host there is no device memory for offload to free."""
    none, every = _peaks(Stack(), example=False)
    module = Stack()
    callback = ApproxBP(memory_budget=(none + every) // 2, offload=OffloadCost(host_bandwidth=1e18))
    _fit(callback, module)
    plan = callback.memory_plan
    assert plan is not None and plan.blocks and plan.offloaded == ()
    assert "offload not considered: training runs on the host (cpu)" in str(plan)
    assert not any(is_offloaded(m) for _, m in blocks_of(module))
