"""Mixture-of-experts experts whose down projections save only the gate and up outputs.

:class:`FusedGatedExperts` is what a conversion puts in place of transformers' gated experts
(Mixtral, Qwen2/3-MoE, ...; see :mod:`lightning_approxbp.conversion.gated_experts`): it keeps the
``gate_up_proj``/``down_proj`` parameters under their names (state dict unchanged) and runs each
expert through :func:`~lightning_approxbp.ops.gated_mlp.gated_down_projection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_approxbp.activations import get_activation
from lightning_approxbp.nn.gated_mlp import take_over
from lightning_approxbp.ops.gated_mlp import gated_down_projection


@dataclass(frozen=True)
class GatedExpertsSpec:
    """The activation (a registry name and the child holding it) and which half of ``gate_up_proj`` is the gate."""

    activation: str
    activation_child: str | None
    gate_first: bool


def run_experts(
    module: nn.Module, spec: GatedExpertsSpec, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, fused: bool
) -> Tensor:
    """Every routed expert on its tokens, weighted and summed; ``fused`` picks the saving op."""
    experts = module.gate_up_proj.shape[0]
    output = torch.zeros_like(hidden)
    with torch.no_grad():
        # experts x top-k x tokens; an index equal to ``experts`` marks an unused slot
        routed = F.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)
        hit = routed.sum(dim=(-1, -2)).nonzero().flatten().tolist()
    for expert in hit:
        if expert == experts:
            continue
        slot, token = torch.where(routed[expert])
        first, second = F.linear(hidden[token], module.gate_up_proj[expert]).chunk(2, dim=-1)
        gate, up = (first, second) if spec.gate_first else (second, first)
        if fused:
            out = gated_down_projection(gate, up, module.down_proj[expert], activation=spec.activation)
        else:
            product = get_activation(spec.activation).torch_forward(gate) * up
            out = F.linear(product, module.down_proj[expert])
        out = out * top_k_weights[token, slot, None]
        output.index_add_(0, token, out.to(output.dtype))
    return output


class FusedGatedExperts(nn.Module):
    """Gated-MLP experts whose down projections save only the gate and up outputs (exact gradients).

    Args:
        spec: the activation and which half of ``gate_up_proj`` is the gate.

    Holds the original ``gate_up_proj``/``down_proj`` parameters and children under their names
    (see :meth:`from_module`).
    """

    def __init__(self, spec: GatedExpertsSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def from_module(cls, original: nn.Module, spec: GatedExpertsSpec) -> FusedGatedExperts:
        """The fused replacement of ``original``, sharing its parameters and children."""
        new = cls(spec)
        for name, parameter in original.named_parameters(recurse=False):  # in the original's order
            new.register_parameter(name, parameter)
        return take_over(new, original)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return run_experts(self, self.spec, hidden_states, top_k_index, top_k_weights, fused=True)

    def extra_repr(self) -> str:
        return f"approxbp: fused gated experts ({self.spec.activation}), save gate and up outputs only, exact gradients"
