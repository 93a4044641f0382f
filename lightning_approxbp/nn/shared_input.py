"""Layers that read a memory-sharing norm's output: they save that tensor itself, not a copy.

- *input-sharing* (:class:`SharedInputLinear`, ``SharedInputConv1D``): no affine, but the layer
  saves the norm's output (a reference to what the norm saves anyway) instead of its own
  autocast copy, and casts it again in backward;
- *merged* (:class:`AffineMergedLinear`, ``AffineMergedConv1D``): also applies the norm's affine
  to its input at compute time, so the norm can drop it.

A conversion builds them with ``from_module`` (see :mod:`lightning_approxbp.conversion.merged`):
they keep the layer's ``weight``/``bias`` Parameter objects under the same names and read
``weight``/``bias`` of the norm at call time, so nothing changes in the state dict and tied or
shared weights stay correct.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from typing_extensions import Self

from lightning_approxbp.ops.affine_linear import affine_linear

L = TypeVar("L", bound=nn.Module)


def norm_affine(norm: nn.Module) -> tuple[Tensor | None, Tensor | None, float]:
    """A norm's ``weight``, ``bias`` and ``offset`` (``None``, ``None``, ``0.0`` where it has none)."""
    return getattr(norm, "weight", None), getattr(norm, "bias", None), float(getattr(norm, "offset", 0.0))


def _hold_affine_source(layer: nn.Module, norm: nn.Module) -> None:
    # A plain reference, not a submodule: the state-dict keys stay those of the original layer.
    layer.__dict__["affine_source"] = norm


def _with_parameters_of(new: L, layer: nn.Module) -> L:
    new.weight, new.bias = layer.weight, layer.bias
    new.train(layer.training)
    return new


class SharedInputLinear(nn.Linear):
    """``nn.Linear`` reading a memory-sharing norm's output: saves that tensor, not a copy.

    Same parameters and state dict keys as the ``nn.Linear`` it is built from (:meth:`from_module`).
    """

    @classmethod
    def from_module(cls, linear: nn.Module, **kwargs: Any) -> Self:
        """The replacement of ``linear``, holding its parameters; ``kwargs`` go to ``__init__``."""
        # The parameters __init__ makes are placeholders (the layer's replace them): on meta they cost nothing.
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        return _with_parameters_of(new, linear)

    def forward(self, x: Tensor) -> Tensor:
        return affine_linear(x, None, None, self.weight, self.bias, share_input=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approxbp: shares its saved input with the norm"


class AffineMergedLinear(SharedInputLinear):
    """``nn.Linear`` whose input is a norm's affine-free output; applies the norm's affine first.

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        affine_source: the norm whose ``weight``/``bias`` (and ``offset``) are applied, read at
            call time; held as a plain reference, not a submodule.
    """

    affine_source: nn.Module

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        affine_source: nn.Module,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _hold_affine_source(self, affine_source)

    def forward(self, x: Tensor) -> Tensor:
        gamma, beta, offset = norm_affine(self.affine_source)
        return affine_linear(x, gamma, beta, self.weight, self.bias, offset=offset, share_input=True)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, approxbp: applies the affine of its input norm"


# Every replacement type (merged and input-sharing): they cast their weight to the autocast
# dtype at each call, like the layers they replace.
SHARED_INPUT_TYPES: list[type[nn.Module]] = [SharedInputLinear, AffineMergedLinear]

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None

if Conv1D is not None:
    # Defined at module level (not inside a function) so that converted models pickle.

    class SharedInputConv1D(Conv1D):
        """transformers ``Conv1D`` (``weight`` is ``in x out``) that saves its input norm's output, not a copy."""

        @classmethod
        def from_module(cls, conv: nn.Module, **kwargs: Any) -> Self:
            """The replacement of ``conv``, holding its parameters; ``kwargs`` go to ``__init__``."""
            with torch.device("meta"):
                new = cls(conv.nf, conv.nx, **kwargs)
            return _with_parameters_of(new, conv)

        def forward(self, x: Tensor) -> Tensor:
            return affine_linear(x, None, None, self.weight, self.bias, transposed=True, share_input=True)

        def extra_repr(self) -> str:
            return "approxbp: shares its saved input with the norm"

    class AffineMergedConv1D(SharedInputConv1D):
        """transformers ``Conv1D`` that applies its input norm's affine (``affine_source``, as
        :class:`AffineMergedLinear`)."""

        affine_source: nn.Module

        def __init__(self, nf: int, nx: int, *, affine_source: nn.Module) -> None:
            super().__init__(nf, nx)
            _hold_affine_source(self, affine_source)

        def forward(self, x: Tensor) -> Tensor:
            gamma, beta, offset = norm_affine(self.affine_source)
            return affine_linear(
                x, gamma, beta, self.weight, self.bias, offset=offset, transposed=True, share_input=True
            )

        def extra_repr(self) -> str:
            return "approxbp: applies the affine of its input norm"

    SHARED_INPUT_TYPES += [SharedInputConv1D, AffineMergedConv1D]
