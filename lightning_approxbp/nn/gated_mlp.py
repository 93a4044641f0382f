"""A gated MLP whose down projection saves only the gate and up outputs (exact gradients).

:class:`FusedGatedMLP` is what a conversion puts in place of a gated MLP (SwiGLU, GeGLU; see
:mod:`lightning_approxbp.conversion.gated_mlp`): it keeps the original children under their
names (state dict unchanged) and runs
:func:`~lightning_approxbp.ops.gated_mlp.gated_down_projection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor, nn

from lightning_approxbp.ops.gated_mlp import gated_down_projection

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class GatedMLPSpec:
    """Which children play which role, and the activation (a registry name).

    Packed (``gate == up``): that one projection's output holds gate and up as its two halves,
    the gate first when ``gate_first``.
    """

    gate: str
    up: str
    down: str
    activation: str
    activation_child: str | None
    gate_first: bool = True

    @property
    def packed(self) -> bool:
        return self.gate == self.up


def gate_and_up(spec: GatedMLPSpec, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The gate and up projections' outputs for ``x`` (the two halves of one output when packed)."""
    if not spec.packed:
        return getattr(module, spec.gate)(x), getattr(module, spec.up)(x)
    first, second = getattr(module, spec.gate)(x).chunk(2, dim=-1)
    return (first, second) if spec.gate_first else (second, first)


def take_over(new: M, original: nn.Module) -> M:
    """Give ``new`` the children, public plain attributes (e.g. ``hidden_size``) and train mode of
    ``original``; the replacement then reads like the original. What ``new.__init__`` set (its
    ``spec``) is kept."""
    for name, child in original.named_children():
        new.add_module(name, child)
    own = set(vars(new))
    new.__dict__.update({k: v for k, v in vars(original).items() if not k.startswith("_") and k not in own})
    new.train(original.training)
    return new


class FusedGatedMLP(nn.Module):
    """A gated MLP whose down projection saves only ``g`` and ``u`` (exact gradients).

    Args:
        spec: which children are the gate, up and down projections, and the activation.

    Holds the original children under their original names (see :meth:`from_module`), so the
    state dict is unchanged.
    """

    def __init__(self, spec: GatedMLPSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def from_module(cls, original: nn.Module, spec: GatedMLPSpec) -> FusedGatedMLP:
        """The fused replacement of ``original``, sharing its children (read now, so children
        replaced before, e.g. merged gate and up projections, are the ones it holds)."""
        return take_over(cls(spec), original)

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        down = getattr(self, spec.down)
        g, u = gate_and_up(spec, self, x)
        return gated_down_projection(g, u, down.weight, down.bias, activation=spec.activation)

    def extra_repr(self) -> str:
        packed = "packed " if self.spec.packed else ""
        return f"approxbp: fused {packed}gated MLP ({self.spec.activation}), saves gate and up outputs only, exact gradients"
