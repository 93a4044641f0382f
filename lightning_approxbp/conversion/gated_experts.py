"""Recognise mixture-of-experts blocks whose experts are gated MLPs, and fuse each expert's down projection.

transformers (5.x) stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek and others as one
module with two 3-D parameters, ``gate_up_proj`` (``experts x 2·intermediate x hidden``) and
``down_proj`` (``experts x hidden x intermediate``), an activation, and a
``forward(hidden_states, top_k_index, top_k_weights)`` that runs every routed expert as
``down(act(gate) * up)``. Such a module is recognised by those parameters and confirmed by
**probing** (its own output on random tokens and routing must equal the formula, which also tells
whether the gate is the first or the second half of ``gate_up_proj``); no class names are listed.

The replacement, :class:`FusedGatedExperts`, keeps both parameters under the same names (state
dict unchanged) and runs each expert through
:func:`~lightning_approxbp.ops.gated_mlp.gated_down_projection`: per expert, only the gate and up
outputs are saved (not the product, nor what the activation keeps), with exact gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_approxbp.activations import get_activation
from lightning_approxbp.conversion.gated_mlp import (
    find_activation,
    reproduced,
    take_over,
)
from lightning_approxbp.ops.gated_mlp import gated_down_projection

_PARAMETERS = {"gate_up_proj", "down_proj"}


@dataclass(frozen=True)
class GatedExpertsSpec:
    """The activation (a registry name and the child holding it) and which half of ``gate_up_proj`` is the gate."""

    activation: str
    activation_child: str | None
    gate_first: bool


def _run_experts(
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


def detect_gated_experts(
    module: nn.Module, values: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[GatedExpertsSpec | None, str | None]:
    """``(spec, None)`` for fusable gated experts; ``(None, reason)`` for experts that cannot be
    fused; ``(None, None)`` for anything else. ``values`` gives the module to probe (e.g. a
    materialised twin of a module on the meta device); default: ``module`` itself."""
    parameters = dict(module.named_parameters(recurse=False))
    if not _PARAMETERS <= set(parameters):
        return None, None
    gate_up, down = parameters["gate_up_proj"], parameters["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return None, None
    name = f"{type(module).__qualname__} experts"
    if set(parameters) != _PARAMETERS:
        extra = ", ".join(sorted(set(parameters) - _PARAMETERS))
        return None, f"{name} not fused: they have more parameters than gate_up_proj and down_proj ({extra})"
    activation = find_activation(module)
    if activation is None:
        return None, f"{name} not fused: no single activation the registry knows"
    experts, double, hidden = gate_up.shape
    if double % 2 or down.shape != (experts, hidden, double // 2):
        return None, f"{name} not fused: weights of shapes {tuple(gate_up.shape)} and {tuple(down.shape)} are not the known layout"
    for gate_first in (True, False):
        spec = GatedExpertsSpec(activation[0], activation[1], gate_first)
        if _reproduces(values(module) if values else module, spec):
            return spec, None
    return None, f"{name} not fused: their output is not down(act(gate) * up) of the gate_up_proj halves"


def _reproduces(module: nn.Module, spec: GatedExpertsSpec) -> bool:
    weight = module.gate_up_proj
    experts, _, hidden = weight.shape
    generator = torch.Generator().manual_seed(0)
    tokens, top_k = 7, min(2, experts)
    x = torch.randn(tokens, hidden, generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]).to(weight.device)
    weights = torch.rand(tokens, top_k, generator=generator).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            expected = module(x, index, weights)
            ours = _run_experts(module, spec, x, index, weights, fused=False)
    except Exception:  # noqa: BLE001 - a module that cannot take this call is not this kind of experts
        return False
    return reproduced(expected, ours, weight.dtype)


class FusedGatedExperts(nn.Module):
    """Gated-MLP experts whose down projections save only the gate and up outputs (exact gradients).

    Holds the original ``gate_up_proj``/``down_proj`` parameters and children under their names.
    """

    spec: GatedExpertsSpec

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return _run_experts(self, self.spec, hidden_states, top_k_index, top_k_weights, fused=True)

    def extra_repr(self) -> str:
        return f"approxbp: fused gated experts ({self.spec.activation}), save gate and up outputs only, exact gradients"


def build_fused_gated_experts(original: nn.Module, spec: GatedExpertsSpec) -> FusedGatedExperts:
    """The fused replacement of ``original``, sharing its parameters and children."""
    new = FusedGatedExperts()
    for name, parameter in original.named_parameters(recurse=False):  # in the original's order
        new.register_parameter(name, parameter)
    return take_over(new, original, spec)
