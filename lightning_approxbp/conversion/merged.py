"""Layers that read a memory-sharing norm's output: the compute-time merge and input sharing.

A registry maps each supported consumer type to a :class:`ConsumerKind`: how to recognise the
op that reads the norm output inside it (for the tracer) and how to build its replacement:

- *merged* (``AffineMergedLinear``, ...): applies the norm's affine to its input, so the norm
  can drop it (pre-LN blocks, where the norm output feeds linear layers only);
- *input-sharing* (``SharedInputLinear``, ...): no affine, but saves the norm's output itself
  (a reference to what the norm saves anyway) instead of its own autocast copy, and casts it
  again in backward. Post-LN blocks (BERT): the norm output is also the fp32 residual stream, so
  each consumer used to keep a bf16 copy of it next to the norm's fp32 one.

Merged replacements share the input too. Replacements keep the consumer's ``weight``/``bias``
Parameter objects under the same names and read ``weight``/``bias`` of the norm at call time,
so nothing changes in the state dict and tied or shared weights stay correct.

Exact types only: subclasses (quantised linears, custom forwards) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_approxbp.ops.affine_linear import affine_linear


def _norm_affine(norm: nn.Module) -> tuple[Tensor | None, Tensor | None, float]:
    return getattr(norm, "weight", None), getattr(norm, "bias", None), float(getattr(norm, "offset", 0.0))


class SharedInputLinear(nn.Linear):
    """``nn.Linear`` reading a memory-sharing norm's output: saves that tensor, not a copy.

    Built by :func:`share_input_of`; same parameters and state dict keys as the original.
    """

    def forward(self, x: Tensor) -> Tensor:
        return affine_linear(x, None, None, self.weight, self.bias, share_input=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approxbp: shares its saved input with the norm"


class AffineMergedLinear(SharedInputLinear):
    """``nn.Linear`` whose input is a norm's affine-free output; applies the norm's affine first.

    Built by :func:`merge_into`; the norm is held as a plain reference (not a submodule), so the
    state dict keys are those of the original ``nn.Linear``.
    """

    affine_source: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        gamma, beta, offset = _norm_affine(self.affine_source)
        return affine_linear(x, gamma, beta, self.weight, self.bias, offset=offset, share_input=True)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, approxbp: applies the affine of its input norm"


def _rebuilt_linear(linear: nn.Module, norm: nn.Module | None) -> nn.Module:
    cls = SharedInputLinear if norm is None else AffineMergedLinear
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
    if norm is not None:
        new.__dict__["affine_source"] = norm
    new.train(linear.training)
    return new


def _linear_reads(func: Callable, args: tuple, kwargs: dict, module: nn.Module, tensor: Tensor) -> bool:
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    return func is F.linear and len(args) > 0 and args[0] is tensor and weight is module.weight


@dataclass(frozen=True)
class ConsumerKind:
    """How one consumer type reads its input and how to merge a norm's affine into it.

    Attributes:
        name: shown in the report.
        op: the torch function that reads the input inside the module's forward.
        reads: ``(func, args, kwargs, module, tensor) -> bool``: the call reads ``tensor`` as
            the layer input with the module's own weight.
        build: ``(module, norm) -> replacement``: merged with ``norm``'s affine, or
            input-sharing only when ``norm`` is ``None``.
    """

    name: str
    op: Callable[..., Any]
    reads: Callable[[Callable, tuple, dict, nn.Module, Tensor], bool]
    build: Callable[[nn.Module, nn.Module | None], nn.Module]


CONSUMER_KINDS: dict[type[nn.Module], ConsumerKind] = {
    nn.Linear: ConsumerKind("Linear", F.linear, _linear_reads, _rebuilt_linear),
}


# Every replacement type (merged and input-sharing): they cast their weight to the autocast
# dtype at each call, like the layers they replace.
MERGED_TYPES: list[type[nn.Module]] = [SharedInputLinear, AffineMergedLinear]

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None

if Conv1D is not None:
    # Defined at module level (not inside a function) so that converted models pickle.

    class SharedInputConv1D(Conv1D):
        """transformers ``Conv1D`` (``weight`` is ``in x out``) that saves its input norm's output, not a copy."""

        def forward(self, x: Tensor) -> Tensor:
            return affine_linear(x, None, None, self.weight, self.bias, transposed=True, share_input=True)

        def extra_repr(self) -> str:
            return "approxbp: shares its saved input with the norm"

    class AffineMergedConv1D(SharedInputConv1D):
        """transformers ``Conv1D`` that applies its input norm's affine."""

        affine_source: nn.Module

        def forward(self, x: Tensor) -> Tensor:
            gamma, beta, offset = _norm_affine(self.affine_source)
            return affine_linear(
                x, gamma, beta, self.weight, self.bias, offset=offset, transposed=True, share_input=True
            )

        def extra_repr(self) -> str:
            return "approxbp: applies the affine of its input norm"

    def _rebuilt_conv1d(conv: nn.Module, norm: nn.Module | None) -> nn.Module:
        cls = SharedInputConv1D if norm is None else AffineMergedConv1D
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in vars(conv).items() if not k.startswith("_") and k != "training"})
        new.weight, new.bias = conv.weight, conv.bias
        if norm is not None:
            new.__dict__["affine_source"] = norm
        new.train(conv.training)
        return new

    def _conv1d_reads(func: Callable, args: tuple, kwargs: dict, module: nn.Module, tensor: Tensor) -> bool:
        return func is torch.addmm and len(args) > 2 and args[1] is tensor and args[2] is module.weight

    CONSUMER_KINDS[Conv1D] = ConsumerKind("Conv1D", torch.addmm, _conv1d_reads, _rebuilt_conv1d)
    MERGED_TYPES += [SharedInputConv1D, AffineMergedConv1D]


def consumer_kind(module: nn.Module) -> ConsumerKind | None:
    """The registry entry for ``module``'s exact type."""
    return CONSUMER_KINDS.get(type(module))


def merge_into(consumer: nn.Module, norm: nn.Module) -> nn.Module:
    """The merged replacement of ``consumer`` that applies ``norm``'s affine to its input."""
    return _kind(consumer).build(consumer, norm)


def share_input_of(consumer: nn.Module) -> nn.Module:
    """The replacement of ``consumer`` that saves its input (a norm's output) by reference."""
    return _kind(consumer).build(consumer, None)


def _kind(consumer: nn.Module) -> ConsumerKind:
    kind = consumer_kind(consumer)
    if kind is None:
        raise ValueError(f"{type(consumer).__name__} is not a supported norm consumer (nn.Linear, transformers Conv1D).")
    return kind


def is_merged(module: nn.Module) -> bool:
    return isinstance(module, tuple(MERGED_TYPES))
