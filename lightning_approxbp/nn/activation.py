"""Approx-BP activation modules: exact forward, k-bit step derivative in backward."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_approxbp.functional import resolve_table
from lightning_approxbp.ops.step_activation import step_activation
from lightning_approxbp.tables import StepTable


class StepActivation(nn.Module):
    """An activation whose backward uses a step-function derivative stored in ``bits`` per element.

    Args:
        activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        bits: 1, 2 or 4.
        table: ``"fitted"`` (default), ``"paper"`` or a :class:`~lightning_approxbp.tables.StepTable`.

    Example::

        >>> import torch
        >>> act = StepActivation("silu", bits=2)
        >>> act
        StepActivation(activation=silu, bits=2, table=fitted)
        >>> act(torch.randn(3, requires_grad=True)).sum().backward()
    """

    def __init__(self, activation: str = "gelu", bits: int = 2, table: StepTable | str = "fitted") -> None:
        super().__init__()
        self.table = resolve_table(activation, bits, table)

    @classmethod
    def from_module(
        cls, original: nn.Module, activation: str, bits: int = 2, table: StepTable | str = "fitted"
    ) -> StepActivation:
        """The replacement of ``original`` (an activation computing ``activation``), in its train mode."""
        new = cls(activation, bits=bits, table=table)
        new.train(original.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return step_activation(x, self.table)

    def extra_repr(self) -> str:
        return f"activation={self.table.activation}, bits={self.table.bits}, table={self.table.kind}"


class ReGELU2(StepActivation):
    """GELU with the paper's 2-bit ReGELU2 backward (Yang et al., ICML 2024)."""

    def __init__(self) -> None:
        super().__init__("gelu", bits=2, table="paper")


class ReSiLU2(StepActivation):
    """SiLU with the paper's 2-bit ReSiLU2 backward (Yang et al., ICML 2024)."""

    def __init__(self) -> None:
        super().__init__("silu", bits=2, table="paper")
