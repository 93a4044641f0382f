"""Linear layers that apply a norm's affine to their input: the compute-time merge.

A registry maps each supported consumer type to a :class:`ConsumerKind`: how to recognise the
op that reads the norm output inside it (for the tracer) and how to build the merged module.
The merged module keeps the consumer's ``weight``/``bias`` Parameter objects under the same
names and reads ``weight``/``bias`` of the norm at call time, so nothing changes in the state
dict and tied or shared weights stay correct (the weights themselves are never rewritten).

Exact types only: subclasses (quantised linears, custom forwards) are not merged into.
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


class AffineMergedLinear(nn.Linear):
    """``nn.Linear`` whose input is a norm's affine-free output; applies the norm's affine first.

    Built by :func:`merge_into`; the norm is held as a plain reference (not a submodule), so the
    state dict keys are those of the original ``nn.Linear``.
    """

    affine_source: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        gamma, beta, offset = _norm_affine(self.affine_source)
        return affine_linear(x, gamma, beta, self.weight, self.bias, offset=offset)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approxbp: applies the affine of its input norm"


def _merged_linear(linear: nn.Module, norm: nn.Module) -> nn.Module:
    new = AffineMergedLinear.__new__(AffineMergedLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
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
        build: ``(module, norm) -> merged module``.
    """

    name: str
    op: Callable[..., Any]
    reads: Callable[[Callable, tuple, dict, nn.Module, Tensor], bool]
    build: Callable[[nn.Module, nn.Module], nn.Module]


CONSUMER_KINDS: dict[type[nn.Module], ConsumerKind] = {
    nn.Linear: ConsumerKind("Linear", F.linear, _linear_reads, _merged_linear),
}


MERGED_TYPES: list[type[nn.Module]] = [AffineMergedLinear]

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None

if Conv1D is not None:
    # Defined at module level (not inside a function) so that converted models pickle.

    class AffineMergedConv1D(Conv1D):
        """transformers ``Conv1D`` (``weight`` is ``in x out``) that applies its input norm's affine."""

        affine_source: nn.Module

        def forward(self, x: Tensor) -> Tensor:
            gamma, beta, offset = _norm_affine(self.affine_source)
            return affine_linear(x, gamma, beta, self.weight, self.bias, offset=offset, transposed=True)

        def extra_repr(self) -> str:
            return "approxbp: applies the affine of its input norm"

    def _merged_conv1d(conv: nn.Module, norm: nn.Module) -> nn.Module:
        new = AffineMergedConv1D.__new__(AffineMergedConv1D)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in vars(conv).items() if not k.startswith("_") and k != "training"})
        new.weight, new.bias = conv.weight, conv.bias
        new.__dict__["affine_source"] = norm
        new.train(conv.training)
        return new

    def _conv1d_reads(func: Callable, args: tuple, kwargs: dict, module: nn.Module, tensor: Tensor) -> bool:
        return func is torch.addmm and len(args) > 2 and args[1] is tensor and args[2] is module.weight

    CONSUMER_KINDS[Conv1D] = ConsumerKind("Conv1D", torch.addmm, _conv1d_reads, _merged_conv1d)
    MERGED_TYPES.append(AffineMergedConv1D)


def consumer_kind(module: nn.Module) -> ConsumerKind | None:
    """The registry entry for ``module``'s exact type."""
    return CONSUMER_KINDS.get(type(module))


def merge_into(consumer: nn.Module, norm: nn.Module) -> nn.Module:
    """The merged replacement of ``consumer`` that applies ``norm``'s affine to its input."""
    kind = consumer_kind(consumer)
    if kind is None:
        raise ValueError(f"Cannot merge a norm affine into {type(consumer).__name__}.")
    return kind.build(consumer, norm)


def is_merged(module: nn.Module) -> bool:
    return isinstance(module, tuple(MERGED_TYPES))
