"""Fit a training step into a memory budget: checkpoint the fewest blocks that make it fit.

Each block's *saving* (what its forward leaves alive beyond its output, measured in the
simulated step) and *recompute cost* (its forward FLOPs, counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on the fake copy) rank the blocks: most bytes
saved per FLOP first (in 5% steps), earlier blocks first among equals (an early block's
recompute runs in backward when fewer activations are still alive). The plan checkpoints the first ``k`` blocks of that order
for the smallest ``k`` whose simulated peak fits, found by simulating candidate ``k`` around the
linear guess and stepping down (or up) until ``k`` fits and ``k - 1`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_approxbp.conversion import ConversionConfig
from lightning_approxbp.memory.budget import parse_budget
from lightning_approxbp.memory.checkpointing import blocks_of, checkpoint_blocks
from lightning_approxbp.memory.estimate import (
    OptimizerFactory,
    StepFn,
    StepMemoryEstimate,
    StepSimulation,
    format_bytes,
)


@dataclass(frozen=True)
class CheckpointPlan:
    """Which blocks to checkpoint to fit a budget, and what that is predicted to cost.

    Attributes:
        blocks: names of the blocks to checkpoint (in the model), in the planner's order.
        budget_bytes: the budget, in bytes.
        before: the estimate without checkpointing.
        after: the estimate with ``blocks`` checkpointed (``before`` when nothing is needed).
        one_fewer_peak_bytes: the simulated peak with one block fewer checkpointed (``None``
            when the plan checkpoints nothing): above the budget, which is why ``blocks`` is the
            fewest.
        recompute_flops: forward FLOPs recomputed in backward per step.
        forward_flops: the whole forward's FLOPs per step (the recompute is this fraction of it).
    """

    blocks: tuple[str, ...]
    budget_bytes: int
    before: StepMemoryEstimate
    after: StepMemoryEstimate
    one_fewer_peak_bytes: int | None
    recompute_flops: int
    forward_flops: int

    def __str__(self) -> str:
        share = self.recompute_flops / self.forward_flops if self.forward_flops else 0.0
        head = (
            f"Memory budget {format_bytes(self.budget_bytes)}: predicted peak {format_bytes(self.before.peak_bytes)}"
            f" -> {format_bytes(self.after.peak_bytes)} (simulated)"
        )
        if not self.blocks:
            return head + "; fits without checkpointing."
        return (
            f"{head}; checkpointing {len(self.blocks)} block(s): {', '.join(self.blocks)}; recompute "
            f"{self.recompute_flops / 1e9:.1f} GFLOP per step ({share:.0%} of the forward)."
        )


def block_flops(simulation: StepSimulation, names: list[str]) -> tuple[dict[str, int], int]:
    """Forward FLOPs of each named block and of the whole model, counted on the fake copy."""
    counter = FlopCounterMode(display=False)
    with simulation.mode, torch.no_grad(), counter, simulation.autocast():
        simulation.step_fn(simulation.model, simulation.inputs)
    counts = counter.get_flop_counts()
    root = type(simulation.model).__name__
    flops = {name: sum(counts.get(f"{root}.{name}", {}).values()) for name in names}
    return flops, sum(counts.get("Global", {}).values())


def plan_checkpointing(
    model: nn.Module,
    example_input: Any,
    budget: float | str,
    *,
    optimizer: str | OptimizerFactory = "adamw",
    precision: str = "32-true",
    loss_fn: Callable[[Any], Tensor] | None = None,
    step: StepFn | None = None,
    convert: bool | ConversionConfig = False,
    share: tuple[object, ...] = (),
) -> CheckpointPlan:
    """The fewest blocks to checkpoint for the simulated step peak to fit ``budget``.

    Blocks are the children of the model's largest ``nn.ModuleList``. Nothing is changed:
    apply the plan with :func:`apply_plan`. The arguments after ``budget`` are those of
    :func:`~lightning_approxbp.memory.estimate_step_memory`; ``share`` lists objects the fake
    copy must reference rather than copy (e.g. a Trainer).

    Args:
        budget: bytes, a size string (``"20GiB"``) or a fraction in ``(0, 1]`` of the device's memory.

    Raises:
        ValueError: for an unreadable or non-positive budget, or one below the smallest peak
            reachable (all blocks checkpointed); the message gives that peak.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Stack(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        ...                                     for _ in range(4))
        ...     def forward(self, x):
        ...         for block in self.blocks:
        ...             x = block(x)
        ...         return x
        >>> model, batch = Stack(), torch.randn(512, 64)
        >>> full = plan_checkpointing(model, batch, 2**40).before.peak_bytes
        >>> plan = plan_checkpointing(model, batch, full - 1)
        >>> len(plan.blocks) >= 1 and plan.after.peak_bytes <= full - 1
        True
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    budget_bytes = parse_budget(budget, device)
    simulation = StepSimulation(
        model, example_input, step=step, loss_fn=loss_fn, optimizer=optimizer, precision=precision,
        convert=convert, share=share,
    )
    return plan_for(simulation, budget_bytes)


def plan_for(simulation: StepSimulation, budget_bytes: int) -> CheckpointPlan:
    """:func:`plan_checkpointing` on a prepared simulation (several budgets can share one)."""
    before = simulation.measure()
    names = [name for name, _ in blocks_of(simulation.model)]
    flops, forward_flops = block_flops(simulation, names)
    if before.peak_bytes <= budget_bytes:
        return CheckpointPlan((), budget_bytes, before, before, None, 0, forward_flops)
    order = _ranked(simulation, names, flops)
    peaks: dict[int, StepMemoryEstimate] = {0: before}

    def peak(k: int) -> int:
        if k not in peaks:
            peaks[k] = simulation.measure(tuple(order[:k]))
        return peaks[k].peak_bytes

    if peak(len(order)) > budget_bytes:
        raise ValueError(
            f"The memory budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) cannot be met: the smallest "
            f"simulated peak, with all {len(order)} blocks checkpointed, is {format_bytes(peak(len(order)))} "
            f"({peak(len(order))} bytes). Raise the budget, lower the batch size, or convert the model first."
        )
    k = _first_guess(before.peak_bytes, peak(len(order)), budget_bytes, len(order))
    while k < len(order) and peak(k) > budget_bytes:
        k += 1
    while k > 1 and peak(k - 1) <= budget_bytes:
        k -= 1
    blocks = tuple(order[:k])
    return CheckpointPlan(
        blocks, budget_bytes, before, peaks[k], peak(k - 1), sum(flops[name] for name in blocks), forward_flops
    )


def _ranked(simulation: StepSimulation, names: list[str], flops: dict[str, int]) -> list[str]:
    """Blocks by bytes saved per recomputed FLOP, most first, in 5% steps; earlier first among equals.

    The steps make blocks that differ by a few bytes (the first block's input is the batch, which
    is alive anyway) count as equal: their order then decides, and an earlier block is worth more
    (checkpointing the last block can even raise the peak: it recomputes when everything else
    is still alive).
    """
    modules = dict(simulation.model.named_modules())
    ratio = {}
    for name in names:
        before, after, output = simulation.module_stats(modules[name])
        ratio[name] = max(after - before - output, 0) / max(flops[name], 1)
    best = max(ratio.values()) or 1.0
    return sorted(names, key=lambda name: (-round(20 * ratio[name] / best), names.index(name)))


def _first_guess(peak_none: int, peak_all: int, budget: int, blocks: int) -> int:
    """The number of blocks a linear saving per block would need."""
    per_block = (peak_none - peak_all) / blocks
    return min(blocks, max(1, math.ceil((peak_none - budget) / per_block))) if per_block > 0 else blocks


def apply_plan(model: nn.Module, plan: CheckpointPlan) -> list[nn.Module]:
    """Checkpoint ``plan.blocks`` in ``model`` (state-dict keys and parameters unchanged); return them."""
    return checkpoint_blocks(model, plan.blocks)
