"""Fit a training step into a memory budget: checkpoint (or offload) the fewest blocks that make it fit.

Each block's *saving* (what its forward leaves alive beyond its output, measured in the
simulated step) and *cost* rank the blocks. A checkpointed block costs its recompute: its
forward FLOPs (counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the fake copy)
over :attr:`OffloadCost.device_flops`. With ``offload`` enabled and a training device other than
the host, a block whose saved bytes cross to the host and back in less modelled time
(:attr:`OffloadCost.host_bandwidth`) is offloaded instead. Most bytes saved per second first (in
5% steps), earlier blocks first among equals (an early block's recompute runs in backward when
fewer activations are still alive). The plan takes the first ``k`` blocks of that order, each
with its lever, for the smallest ``k`` whose simulated peak fits, found by simulating candidate
``k`` around the linear guess and stepping down (or up) until ``k`` fits and ``k - 1`` does not.
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
from lightning_approxbp.memory.offload import HOST, offload_blocks


@dataclass(frozen=True)
class OffloadCost:
    """How the planner weighs offloading a block's saved tensors against recomputing its forward.

    Both levers are costed in modelled seconds per step, transfers not overlapped with compute
    (a pessimistic view of offload: the copies to the host can overlap the next block's forward).

    Attributes:
        host_bandwidth: bytes per second between host and device, each way (default 20e9: PCIe
            4.0 x16 as measured with pinned memory, well below its 32 GB/s nominal).
        device_flops: FLOP/s the device reaches on a recomputed forward (default 100e12: an
            A100/H100-class GPU in bf16 at a fraction of its peak).

    Example::

        >>> cost = OffloadCost()
        >>> cost.offload_seconds(10**9) > cost.recompute_seconds(10**12)  # 1 GB out and back vs 1 TFLOP
        True
    """

    host_bandwidth: float = 20e9
    device_flops: float = 100e12

    def __post_init__(self) -> None:
        if not (self.host_bandwidth > 0 and self.device_flops > 0):
            raise ValueError(f"OffloadCost needs positive rates, got {self}.")

    def offload_seconds(self, nbytes: int) -> float:
        """Time to copy ``nbytes`` to the host in forward and back in backward."""
        return 2 * nbytes / self.host_bandwidth

    def recompute_seconds(self, flops: int) -> float:
        return flops / self.device_flops


@dataclass(frozen=True)
class CheckpointPlan:
    """Which blocks to checkpoint to fit a budget, and what that is predicted to cost.

    Attributes:
        blocks: names of the blocks the plan changes (in the model), in the planner's order:
            those in ``offloaded`` keep their saved tensors in host memory, the others are
            checkpointed.
        budget_bytes: the budget, in bytes.
        before: the estimate without checkpointing.
        after: the estimate with ``blocks`` checkpointed (``before`` when nothing is needed).
        one_fewer_peak_bytes: the simulated peak with one block fewer checkpointed or offloaded
            (``None`` when the plan changes nothing): above the budget, which is why ``blocks``
            is the fewest.
        recompute_flops: forward FLOPs recomputed in backward per step.
        forward_flops: the whole forward's FLOPs per step (the recompute is this fraction of it).
        offloaded: the blocks of ``blocks`` that are offloaded rather than checkpointed.
        offload_note: why offload was not considered though asked for (e.g. the training device
            is the host), else ``""``.
    """

    blocks: tuple[str, ...]
    budget_bytes: int
    before: StepMemoryEstimate
    after: StepMemoryEstimate
    one_fewer_peak_bytes: int | None
    recompute_flops: int
    forward_flops: int
    offloaded: tuple[str, ...] = ()
    offload_note: str = ""

    @property
    def checkpointed(self) -> tuple[str, ...]:
        """The blocks of ``blocks`` that are checkpointed."""
        return tuple(name for name in self.blocks if name not in self.offloaded)

    @property
    def transfer_bytes(self) -> int:
        """Bytes the offloaded blocks move between device and host per step (out and back)."""
        return 2 * self.after.offloaded_bytes

    def __str__(self) -> str:
        share = self.recompute_flops / self.forward_flops if self.forward_flops else 0.0
        head = (
            f"Memory budget {format_bytes(self.budget_bytes)}: predicted peak {format_bytes(self.before.peak_bytes)}"
            f" -> {format_bytes(self.after.peak_bytes)} (simulated)"
        )
        note = f" ({self.offload_note})" if self.offload_note else ""
        if not self.blocks:
            return f"{head}; fits without checkpointing.{note}"
        parts = []
        if self.checkpointed:
            parts.append(
                f"checkpointing {len(self.checkpointed)} block(s): {', '.join(self.checkpointed)}; recompute "
                f"{self.recompute_flops / 1e9:.1f} GFLOP per step ({share:.0%} of the forward)"
            )
        if self.offloaded:
            parts.append(
                f"offloading the saved tensors of {len(self.offloaded)} block(s) to host memory: "
                f"{', '.join(self.offloaded)}; {format_bytes(self.transfer_bytes)} moved per step (out and back)"
            )
        return f"{head}; {'; '.join(parts)}.{note}"


def block_flops(simulation: StepSimulation, names: list[str]) -> tuple[dict[str, int], int]:
    """Forward FLOPs of each named block and of the whole model, counted on the fake copy."""
    counter = FlopCounterMode(display=False)
    with simulation.mode, torch.no_grad(), counter, simulation.autocast():
        simulation.step_fn(simulation.model, simulation.inputs)
    simulation.after_forward_only()
    counts = counter.get_flop_counts()
    modules = dict(simulation.model.named_modules())
    flops = {name: sum(counts.get(_counted_name(modules, name, counts), {}).values()) for name in names}
    return flops, sum(counts.get("Global", {}).values())


def _counted_name(modules: dict[str, nn.Module], name: str, counts: Any) -> str:
    """The name FlopCounterMode gave module ``name``: its path from the outermost module the step
    called, after that module's class name (``Stack.blocks.0`` when a ``training_step`` calls
    ``self.stack``, ``Lit.stack.blocks.0`` when it calls ``self``); the model's own when none matches."""
    parts = name.split(".")
    for cut in range(len(parts)):  # outermost ancestor first
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if prefix in modules and (candidate := f"{type(modules[prefix]).__name__}.{rest}") in counts:
            return candidate
    return f"{type(modules['']).__name__}.{name}"


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
    offload: bool | OffloadCost = False,
    device: torch.device | str | None = None,
) -> CheckpointPlan:
    """The fewest blocks to checkpoint (or offload) for the simulated step peak to fit ``budget``.

    Blocks are the children of the model's largest ``nn.ModuleList``. Nothing is changed:
    apply the plan with :func:`apply_plan`. The arguments after ``budget`` are those of
    :func:`~lightning_approxbp.memory.estimate_step_memory`; ``share`` lists objects the fake
    copy must reference rather than copy (e.g. a Trainer).

    Args:
        budget: bytes, a size string (``"20GiB"``) or a fraction in ``(0, 1]`` of the device's memory.
        offload: ``True`` or an :class:`OffloadCost`: a block may keep its saved tensors in host
            memory instead of recomputing, where that is modelled to cost less time. Only when
            ``device`` is not the host (on a CPU there is no device memory to free).
        device: the device training runs on, which a fractional budget and ``offload`` refer to
            (default: the model's; give it when the model is moved after planning).

    Raises:
        ValueError: for an unreadable or non-positive budget, or one below the smallest peak
            reachable (all blocks checkpointed or offloaded); the message gives that peak.

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
    target = torch.device(device) if device is not None else next(iter(model.parameters()), torch.empty(0)).device
    budget_bytes = parse_budget(budget, target)
    simulation = StepSimulation(
        model, example_input, step=step, loss_fn=loss_fn, optimizer=optimizer, precision=precision,
        convert=convert, share=share,
    )
    cost = OffloadCost() if offload is True else offload or None
    note = ""
    if cost is not None and target.type == HOST.type:
        cost, note = None, f"offload not considered: training runs on the host ({target.type})"
    return plan_for(simulation, budget_bytes, cost, note)


def plan_for(
    simulation: StepSimulation, budget_bytes: int, offload: OffloadCost | None = None, offload_note: str = ""
) -> CheckpointPlan:
    """:func:`plan_checkpointing` on a prepared simulation (several budgets can share one).

    ``offload``: the cost model under which blocks may be offloaded; ``None``: checkpoint only.
    """
    before = simulation.measure()
    names = [name for name, _ in blocks_of(simulation.model)]
    flops, forward_flops = block_flops(simulation, names)
    if before.peak_bytes <= budget_bytes:
        return CheckpointPlan((), budget_bytes, before, before, None, 0, forward_flops, offload_note=offload_note)
    order, offloaded = _ranked(simulation, names, flops, offload)
    peaks: dict[int, StepMemoryEstimate] = {0: before}

    def peak(k: int) -> int:
        if k not in peaks:
            chosen = order[:k]
            peaks[k] = simulation.measure(
                tuple(name for name in chosen if name not in offloaded), tuple(name for name in chosen if name in offloaded)
            )
        return peaks[k].peak_bytes

    if peak(len(order)) > budget_bytes:
        levers = "checkpointed" if not offloaded else f"checkpointed or offloaded ({len(offloaded)} offloaded)"
        raise ValueError(
            f"The memory budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) cannot be met: the smallest "
            f"simulated peak, with all {len(order)} blocks {levers}, is {format_bytes(peak(len(order)))} "
            f"({peak(len(order))} bytes). Raise the budget, lower the batch size, or convert the model first."
        )
    k = _first_guess(before.peak_bytes, peak(len(order)), budget_bytes, len(order))
    while k < len(order) and peak(k) > budget_bytes:
        k += 1
    while k > 1 and peak(k - 1) <= budget_bytes:
        k -= 1
    blocks = tuple(order[:k])
    chosen_offloaded = tuple(name for name in blocks if name in offloaded)
    recompute = sum(flops[name] for name in blocks if name not in offloaded)
    return CheckpointPlan(
        blocks, budget_bytes, before, peaks[k], peak(k - 1), recompute, forward_flops, chosen_offloaded, offload_note
    )


def _ranked(
    simulation: StepSimulation, names: list[str], flops: dict[str, int], offload: OffloadCost | None
) -> tuple[list[str], set[str]]:
    """Blocks by bytes saved per modelled second, most first, in 5% steps; earlier first among equals;
    and the blocks to offload (those whose transfer is modelled to take less time than their recompute).

    The steps make blocks that differ by a few bytes (the first block's input is the batch, which
    is alive anyway) count as equal: their order then decides, and an earlier block is worth more
    (checkpointing the last block can even raise the peak: it recomputes when everything else
    is still alive).
    """
    modules = dict(simulation.model.named_modules())
    cost = offload or OffloadCost()  # without offload only the ratios matter, not the rate
    ratio, offloaded = {}, set()
    for name in names:
        before, after, output = simulation.module_stats(modules[name])
        saved = max(after - before - output, 0)
        seconds = cost.recompute_seconds(max(flops[name], 1))
        if offload is not None and offload.offload_seconds(saved) < seconds:
            seconds = offload.offload_seconds(saved)
            offloaded.add(name)
        ratio[name] = saved / seconds
    best = max(ratio.values()) or 1.0
    return sorted(names, key=lambda name: (-round(20 * ratio[name] / best), names.index(name))), offloaded


def _first_guess(peak_none: int, peak_all: int, budget: int, blocks: int) -> int:
    """The number of blocks a linear saving per block would need."""
    per_block = (peak_none - peak_all) / blocks
    return min(blocks, max(1, math.ceil((peak_none - budget) / per_block))) if per_block > 0 else blocks


def apply_plan(model: nn.Module, plan: CheckpointPlan) -> list[nn.Module]:
    """Checkpoint or offload ``plan.blocks`` in ``model`` (state-dict keys and parameters unchanged);
    return the checkpointed modules, then the offloaded ones."""
    offloaded = offload_blocks(model, plan.offloaded)
    return [*checkpoint_blocks(model, plan.checkpointed), *(wrapper.module for wrapper in offloaded)]
