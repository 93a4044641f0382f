"""A copy of a model on fake tensors (shapes, dtypes and devices, no storage), converted if asked.

The copy shares nothing mutable with the model: its parameters and buffers are fake tensors
made from the real ones, so running a training step on it allocates nothing and leaves the real
model as it was.

Conversion needs real values (activations and norms are recognised by running them, the
converted output is verified, a kept affine's ``|weight|`` is read), so it runs first on a
*structural* copy of the model that shares the real parameters and buffers (modules copied,
tensors not), probed with the first samples of the example input only; the converted structure
is then copied onto fake tensors. :func:`~lightning_approxbp.conversion.convert` never changes
parameter values, and its probe restores buffers and RNG state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from lightning_approxbp.conversion import ConversionConfig, ConversionReport, convert
from lightning_approxbp.nn.norm import ConvertedNorm

PROBE_SAMPLES = 2  # samples of the example input the conversion probe runs on


def structural_copy(model: nn.Module, share: Iterable[object] = ()) -> nn.Module:
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors.

    ``share``: other objects the copy must reference rather than copy (e.g. a Trainer).
    """
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update({id(obj): obj for obj in share})
    return copy.deepcopy(model, memo)


def first_samples(example_input: Any, samples: int = PROBE_SAMPLES) -> Any:
    """``example_input`` with every tensor cut to its first ``samples`` rows, when all tensors
    share one leading size larger than that; else unchanged."""
    leaves, spec = tree_flatten(example_input)
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves if isinstance(leaf, Tensor)}
    if len(sizes) != 1 or (size := sizes.pop()) is None or size <= samples:
        return example_input
    return tree_unflatten([leaf[:samples] if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)


def converted_copy(
    model: nn.Module,
    example_input: Any,
    config: ConversionConfig,
    share: Iterable[object] = (),
    step: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """A structural copy of ``model`` converted with ``config``, probed on the first samples of
    ``example_input`` (passed to ``forward``, or to ``step(module, batch)`` when given)."""
    shadow = structural_copy(model, share)
    sample = first_samples(example_input)
    if step is None:
        return shadow, convert(shadow, sample, config=config)
    return shadow, convert(shadow, probe=lambda module: step(module, sample), probe_label="step", config=config)


def fake_copy(model: nn.Module, mode: FakeTensorMode, share: Iterable[object] = ()) -> nn.Module:
    """``model`` copied onto fake tensors of ``mode`` (same devices, dtypes, shapes, parameter identity)."""
    memo: dict[int, Any] = {id(obj): obj for obj in share}
    fixed = _weight_checks(model)
    with FakeCopyMode(mode):
        fake = copy.deepcopy(model, memo)
    for name, module in fake.named_modules():
        if name in fixed:
            # A kept affine re-reads min |weight| after each optimizer step (a value fake tensors do
            # not have): the copy keeps the real model's current answer.
            module._keeps_unsafe_affine = _constant(fixed[name])  # type: ignore[method-assign]
    return fake


def fake_input(example_input: Any, mode: FakeTensorMode) -> Any:
    """``example_input`` with every tensor made fake in ``mode``."""
    return tree_map_only(Tensor, lambda t: mode.from_tensor(t, static_shapes=True), example_input)


def _weight_checks(model: nn.Module) -> dict[str, bool]:
    return {name: m._keeps_unsafe_affine() for name, m in model.named_modules() if isinstance(m, ConvertedNorm)}


def _constant(value: bool) -> Any:
    return lambda: value


def new_fake_mode() -> FakeTensorMode:
    """The mode simulations run in. Real constants (e.g. the package's step tables) may meet fake tensors."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def model_device(model: nn.Module) -> torch.device:
    tensor = next(iter((*model.parameters(), *model.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")
