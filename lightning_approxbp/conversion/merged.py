"""Layers that read a memory-sharing norm's output: the compute-time merge and input sharing.

A registry maps each supported consumer type to a :class:`ConsumerKind`: how to recognise the
op that reads the norm output inside it (for the tracer) and how to build its replacement
(the modules are in :mod:`lightning_approxbp.nn.shared_input`):

- *merged* (``AffineMergedLinear``, ...): applies the norm's affine to its input, so the norm
  can drop it (pre-LN blocks, where the norm output feeds linear layers only);
- *input-sharing* (``SharedInputLinear``, ...): no affine, but saves the norm's output itself
  (a reference to what the norm saves anyway) instead of its own autocast copy, and casts it
  again in backward. Post-LN blocks (BERT): the norm output is also the fp32 residual stream, so
  each consumer used to keep a bf16 copy of it next to the norm's fp32 one.

Merged replacements share the input too. Exact types only: subclasses (quantised linears,
custom forwards) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_approxbp.nn.shared_input import (
    AffineMergedLinear,
    Conv1D,
    SharedInputLinear,
)


def _linear_reads(func: Callable, args: tuple, kwargs: dict, module: nn.Module, tensor: Tensor) -> bool:
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    return func is F.linear and len(args) > 0 and args[0] is tensor and weight is module.weight


@dataclass(frozen=True)
class ConsumerKind:
    """How one consumer type reads its input and which modules replace it.

    Attributes:
        name: shown in the report.
        op: the torch function that reads the input inside the module's forward.
        reads: ``(func, args, kwargs, module, tensor) -> bool``: the call reads ``tensor`` as
            the layer input with the module's own weight.
        shared: the input-sharing replacement type (``from_module(layer)``).
        merged: the merged replacement type (``from_module(layer, affine_source=norm)``).
    """

    name: str
    op: Callable[..., Any]
    reads: Callable[[Callable, tuple, dict, nn.Module, Tensor], bool]
    shared: type[Any]
    merged: type[Any]


CONSUMER_KINDS: dict[type[nn.Module], ConsumerKind] = {
    nn.Linear: ConsumerKind("Linear", F.linear, _linear_reads, SharedInputLinear, AffineMergedLinear),
}

if Conv1D is not None:
    from lightning_approxbp.nn.shared_input import AffineMergedConv1D, SharedInputConv1D

    def _conv1d_reads(func: Callable, args: tuple, kwargs: dict, module: nn.Module, tensor: Tensor) -> bool:
        return func is torch.addmm and len(args) > 2 and args[1] is tensor and args[2] is module.weight

    CONSUMER_KINDS[Conv1D] = ConsumerKind("Conv1D", torch.addmm, _conv1d_reads, SharedInputConv1D, AffineMergedConv1D)


def consumer_kind(module: nn.Module) -> ConsumerKind | None:
    """The registry entry for ``module``'s exact type."""
    return CONSUMER_KINDS.get(type(module))


def merge_into(consumer: nn.Module, norm: nn.Module) -> nn.Module:
    """The merged replacement of ``consumer`` that applies ``norm``'s affine to its input."""
    return _kind(consumer).merged.from_module(consumer, affine_source=norm)


def share_input_of(consumer: nn.Module) -> nn.Module:
    """The replacement of ``consumer`` that saves its input (a norm's output) by reference."""
    return _kind(consumer).shared.from_module(consumer)


def _kind(consumer: nn.Module) -> ConsumerKind:
    kind = consumer_kind(consumer)
    if kind is None:
        raise ValueError(f"{type(consumer).__name__} is not a supported norm consumer (nn.Linear, transformers Conv1D).")
    return kind
