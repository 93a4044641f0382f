"""Whole-step peak memory by simulation: one training step replayed on fake tensors.

A step (forward, loss, backward, optimizer step, ``zero_grad``) runs on a fake copy of the
model under :class:`torch.distributed._tools.mem_tracker.MemTracker`, which sees every tensor
storage as it is created and freed and sorts it into parameters, buffers, gradients, optimizer
state, activations (made in the forward) and temporaries (made in the backward). The step is run
twice and the second one is measured: the steady state, with the optimizer state allocated.

What the figure leaves out: the CUDA context and library workspaces (cuBLAS, cuDNN, NCCL),
the caching allocator's rounding beyond 512 bytes, fragmentation and cached free blocks (what
``torch.cuda.max_memory_reserved`` adds to ``max_memory_allocated``), and kernels that differ by
device: a simulation on CPU replays CPU kernels (e.g. the math path of attention, not flash).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState
from torch.utils._pytree import tree_leaves, tree_map_only

from lightning_approxbp.conversion import ConversionConfig, ConversionReport
from lightning_approxbp.memory.checkpointing import checkpointed_blocks
from lightning_approxbp.memory.fake import (
    converted_copy,
    fake_copy,
    fake_input,
    model_device,
    new_fake_mode,
)
from lightning_approxbp.memory.offload import SIMULATED_HOST, offloaded_blocks

StepFn = Callable[[nn.Module, Any], Tensor]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
_TOTAL = "Total"
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_TRUE = {"32-true": None, "32": None, "bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
PRECISIONS: tuple[str, ...] = (*_TRUE, *_MIXED)
_PARTS = {
    "parameters": _MemRefType.PARAM,
    "buffers": _MemRefType.BUFFER,
    "gradients": _MemRefType.GRAD,
    "optimizer_state": _MemRefType.OPT,
    "activations": _MemRefType.ACT,
    "temporaries": _MemRefType.TEMP,
    "inputs": _MemRefType.OTH,
}


@dataclass(frozen=True)
class StepMemoryEstimate:
    """The predicted peak memory of one steady-state training step and what it is made of.

    Attributes:
        peak_bytes: the step's peak on the model's device.
        parts: the peak split by kind (``parameters``, ``buffers``, ``gradients``,
            ``optimizer_state``, ``activations``, ``temporaries``, ``inputs``), in bytes.
        phase: where the peak occurs: ``"forward"``, ``"backward"`` or ``"optimizer step"``.
        module: the innermost module running at the peak (its name in the model; ``""`` for
            none, e.g. the loss or the optimizer).
        device: the device the step was simulated for.
        precision: the Lightning precision string simulated.
        conversion: the report of the conversion simulated, ``None`` for the model as it is.
        checkpointed: the names of the blocks that recompute their forward (activation
            checkpointing), if any.
        offloaded: the names of the blocks whose saved tensors are offloaded to host memory, if any.
        offloaded_bytes: bytes those blocks copy to the host per step (each comes back in backward).
    """

    peak_bytes: int
    parts: dict[str, int]
    phase: str
    module: str
    device: str
    precision: str
    conversion: ConversionReport | None = None
    checkpointed: tuple[str, ...] = ()
    offloaded: tuple[str, ...] = ()
    offloaded_bytes: int = 0

    def __str__(self) -> str:
        kind = "converted" if self.conversion is not None else "as it is"
        lines = [f"Step memory estimate ({kind}, {self.precision}, {self.device}, simulated)"]
        width = max(len(name) for name in self.parts)
        for name, value in self.parts.items():
            lines.append(f"  {name.replace('_', ' '):<{width}}  {format_bytes(value):>11}")
        lines.append(f"  {'peak':<{width}}  {format_bytes(self.peak_bytes):>11}  in the {self.phase}"
                     + (f" of {self.module}" if self.module else ""))
        if self.checkpointed:
            lines.append(f"  checkpointed blocks: {len(self.checkpointed)} ({', '.join(self.checkpointed)})")
        if self.offloaded:
            lines.append(f"  offloaded blocks: {len(self.offloaded)} ({', '.join(self.offloaded)}), "
                         f"{format_bytes(self.offloaded_bytes)} to the host and back per step")
        return "\n".join(lines)


def format_bytes(value: int) -> str:
    """``value`` in KiB, MiB or GiB (the largest unit it reaches 10 of), e.g. ``'512.0 MiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= 10 * size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


class NotesPeak:
    """Mixin for a MemTracker: also notes where (phase, innermost module) each new peak is reached.

    It reads MemTracker's private state (``_peak_mem``, ``_in_opt``, ``_mod_tracker``,
    ``_param_to_grad_hook_handles``; checked against torch 2.13): the public API reports the
    peak but not where it happened. The class using it sets ``device``, ``phase`` and ``module``.
    """

    device: torch.device
    phase: str
    module: str

    def _update_peak_stats(self, peak_state: Any) -> None:
        before = self._peak_mem.get(self.device, 0)
        super()._update_peak_stats(peak_state)  # type: ignore[misc]
        if self._peak_mem.get(self.device, 0) > before:
            self.phase = "optimizer step" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
            names = [name for name in self._mod_tracker.parents if name != "Global"]
            self.module = max(names, key=lambda name: name.count("."), default="")

    def skip_frozen(self, model: nn.Module) -> None:
        """Do not hook frozen parameters: MemTracker hooks every parameter for its gradient, and
        ``register_hook`` fails on one that needs none (LoRA, frozen backbones)."""
        for parameter in model.parameters():
            if not parameter.requires_grad:
                self._param_to_grad_hook_handles[parameter] = (_NO_HOOK, _NO_HOOK)


class _NoHook:
    def remove(self) -> None:
        return None


_NO_HOOK = _NoHook()


class _PeakTracker(NotesPeak, MemTracker):
    """MemTracker noting where each new peak is reached (see :class:`NotesPeak`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.phase, self.module = "forward", ""


def default_step(module: nn.Module, example_input: Any) -> Tensor:
    """Forward like :func:`~lightning_approxbp.conversion.probe.probe_from_example`, then the loss:
    the output's ``loss`` when it has one (transformers models given labels), else the mean of its
    first floating-point tensor."""
    output = _forward(module, example_input)
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    floats = [t for t in tree_leaves(output.to_tuple() if hasattr(output, "to_tuple") else output)
              if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        raise ValueError("The model's output has no floating-point tensor to take a loss from; pass step=... or loss_fn=...")
    return floats[0].mean()


def _optimizer_factory(optimizer: str | OptimizerFactory) -> OptimizerFactory:
    if callable(optimizer):
        return optimizer
    factories: dict[str, OptimizerFactory] = {
        "adamw": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]),
        "adam": lambda m: torch.optim.Adam([p for p in m.parameters() if p.requires_grad]),
        "sgd": lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9),
    }
    if optimizer not in factories:
        raise ValueError(f"Unknown optimizer {optimizer!r}: use one of {', '.join(factories)} or a function module -> optimizer.")
    return factories[optimizer]


class StepSimulation:
    """A fake copy of a model, warmed up by one step, on which steps can be measured.

    Used by :func:`estimate_step_memory` (one measurement) and the checkpointing planner (one
    per candidate plan, without warming up again). The arguments are those of
    :func:`estimate_step_memory`; ``share`` lists objects the copies must reference rather than
    copy (e.g. the Trainer a LightningModule points to).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> simulation = StepSimulation(nn.Sequential(nn.Linear(64, 256), nn.GELU()), torch.randn(32, 64))
        >>> simulation.measure().phase  # a small model: weights and AdamW state dominate
        'optimizer step'
        >>> simulation.measure() is simulation.measure()  # simulated once
        True
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        step: StepFn | None = None,
        loss_fn: Callable[[Any], Tensor] | None = None,
        optimizer: str | OptimizerFactory = "adamw",
        precision: str = "32-true",
        convert: bool | ConversionConfig = False,
        share: tuple[object, ...] = (),
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
        if step is not None and loss_fn is not None:
            raise ValueError("Pass either step or loss_fn, not both.")
        self.precision = precision
        self.device = model_device(model)
        self.conversion: ConversionReport | None = None
        source = model
        if convert is not False:
            config = convert if isinstance(convert, ConversionConfig) else ConversionConfig()
            source, self.conversion = converted_copy(model, example_input, config, share, step)
        self.mode = new_fake_mode()
        self.model = self._fake_model(source, share)
        with self.mode:
            if _TRUE.get(precision) is not None:
                self.model.to(_TRUE[precision])
            self.inputs = fake_input(example_input, self.mode)
            if _TRUE.get(precision) is not None:
                cast = _TRUE[precision]
                self.inputs = tree_map_only(Tensor, lambda t: t.to(cast) if t.is_floating_point() else t, self.inputs)
            self.optimizer = _optimizer_factory(optimizer)(self.model)
        if loss_fn is not None:
            self.step_fn: StepFn = lambda module, batch: loss_fn(_forward(module, batch))
        else:
            self.step_fn = step or default_step
        self._measured: dict[tuple[tuple[str, ...], tuple[str, ...]], StepMemoryEstimate] = {}
        self._run_step(None)  # the measured steps find gradients freed and optimizer state allocated

    def _fake_model(self, source: nn.Module, share: tuple[object, ...]) -> nn.Module:
        """The fake copy the steps run on."""
        return fake_copy(source, self.mode, share)

    def _new_tracker(self) -> MemTracker:
        """A tracker for one measured step, tracking the model, optimizer and inputs."""
        tracker = _PeakTracker(self.device)
        tracker.skip_frozen(self.model)
        tracker.track_external(self.model, self.optimizer, self.inputs)
        return tracker

    def after_forward_only(self) -> None:
        """Called after a forward without backward on the copy (the planner's FLOP count); nothing to undo here."""

    parts_of: Mapping[str, Any] = _PARTS  # the estimate's parts: name -> the tracker's reference type

    def measure(self, checkpointed: tuple[str, ...] = (), offloaded: tuple[str, ...] = ()) -> StepMemoryEstimate:
        """One step's peak, with the blocks named in ``checkpointed`` recomputing their forward
        and those in ``offloaded`` keeping their saved tensors in host memory.

        The simulated device stands for the accelerator even on CPU: offloaded tensors go to a
        stand-in host (the meta device), so they leave the device's peak as they would on a GPU.
        Steady-state steps are alike, so each plan is simulated once and remembered.
        """
        key = (tuple(sorted(checkpointed)), tuple(sorted(offloaded)))
        if key not in self._measured:
            self._measured[key] = self._measure(checkpointed, offloaded)
        return self._measured[key]

    def _measure(self, checkpointed: tuple[str, ...], offloaded: tuple[str, ...]) -> StepMemoryEstimate:
        with (
            checkpointed_blocks(self.model, checkpointed),
            offloaded_blocks(self.model, offloaded, SIMULATED_HOST) as wrappers,
        ):
            tracker = self._new_tracker()
            self._run_step(tracker)
        if not checkpointed and not offloaded:
            self._plain_tracker = tracker
        snapshot = tracker.get_tracker_snapshot("peak").get(self.device, {})
        parts = {name: int(snapshot.get(kind, 0)) for name, kind in self.parts_of.items()}
        root = type(self.model).__name__
        module = tracker.module.removeprefix(root).removeprefix(".")
        return StepMemoryEstimate(
            int(snapshot.get(_TOTAL, 0)), parts, tracker.phase, module, str(self.device), self.precision,
            self.conversion, checkpointed, offloaded, sum(wrapper.moved_bytes for wrapper in wrappers),
        )

    def module_stats(self, module: nn.Module) -> tuple[int, int, int]:
        """(total before, total after, output bytes) of ``module``'s forward in the step without checkpointing."""
        self.measure()
        stats = self._plain_tracker.memory_tracking[module]
        before = stats.snapshots[_ModState.PRE_FW][0][self.device][_TOTAL]
        after = stats.snapshots[_ModState.POST_FW][0][self.device][_TOTAL]
        return before, after, stats.output_mem

    def autocast(self) -> Any:
        """The autocast context of the precision (forward and loss only, as Lightning does)."""
        dtype = _MIXED.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _run_step(self, tracker: MemTracker | None) -> None:
        with self.mode, _quiet(), tracker if tracker is not None else nullcontext():
            self.model.train()
            with self.autocast():
                loss = self.step_fn(self.model, self.inputs)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            del loss


def _forward(module: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return module(**example_input)
    if isinstance(example_input, (tuple, list)):
        return module(*example_input)
    return module(example_input)


@contextmanager
def _quiet() -> Iterator[None]:
    # MemTracker warns for every module whose backward hook finds it collected; not the user's concern
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        yield


def estimate_step_memory(
    model: nn.Module,
    example_input: Any,
    *,
    optimizer: str | OptimizerFactory = "adamw",
    precision: str = "32-true",
    loss_fn: Callable[[Any], Tensor] | None = None,
    step: StepFn | None = None,
    convert: bool | ConversionConfig = False,
) -> StepMemoryEstimate:
    """Predict the peak memory of one training step of ``model`` on ``example_input``, without running it.

    The step is simulated on fake tensors (see the module docstring for what that leaves out):
    ``model``'s parameters are not touched, no gradient is created, no activation allocated.
    With ``convert``, the model is simulated as :func:`~lightning_approxbp.convert` would make
    it (the real model is not converted; the conversion probe runs on its first 2 samples).

    Args:
        model: the model, on the device to simulate (CPU on a CPU-only PyTorch build).
        example_input: one full batch as ``forward`` takes it (a tensor, a tuple of arguments
            or a dict of keyword arguments).
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, or a function ``module -> optimizer``
            (built on the fake copy's trainable parameters).
        precision: a Lightning precision string: ``"32-true"``, ``"bf16-mixed"`` (autocast around
            forward and loss), ``"bf16-true"`` (the model cast), ``"16-mixed"``, ``"16-true"``.
        loss_fn: ``output -> loss``; default: ``output.loss`` when present, else the mean of the
            first floating-point output.
        step: instead of ``loss_fn``, ``(module, batch) -> loss`` (e.g. a ``training_step``).
        convert: ``True`` or a :class:`~lightning_approxbp.ConversionConfig`: simulate the model
            converted.

    Returns:
        A :class:`StepMemoryEstimate`; ``print`` it for a table.

    Raises:
        ValueError: for an unknown precision or optimizer, or ``step`` with ``loss_fn``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
        >>> estimate = estimate_step_memory(model, torch.randn(64, 256))
        >>> estimate.parts["parameters"] == sum(p.numel() * 4 for p in model.parameters())
        True
        >>> converted = estimate_step_memory(model, torch.randn(64, 256), convert=True)
        >>> converted.peak_bytes <= estimate.peak_bytes
        True
    """
    simulation = StepSimulation(
        model, example_input, step=step, loss_fn=loss_fn, optimizer=optimizer, precision=precision, convert=convert
    )
    return simulation.measure()
