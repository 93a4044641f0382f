"""The gated experts rule: recognise mixture-of-experts blocks whose experts are gated MLPs, and
fuse each expert's down projection.

transformers (5.x) stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek and others as one
module with two 3-D parameters, ``gate_up_proj`` (``experts x 2·intermediate x hidden``) and
``down_proj`` (``experts x hidden x intermediate``), an activation, and a
``forward(hidden_states, top_k_index, top_k_weights)`` that runs every routed expert as
``down(act(gate) * up)``. Such a module is recognised by those parameters and confirmed by
**probing** (its own output on random tokens and routing must equal the formula, which also tells
whether the gate is the first or the second half of ``gate_up_proj``); no class names are listed.

The replacement, :class:`~lightning_approxbp.nn.gated_experts.FusedGatedExperts`, keeps both parameters under the same names (state
dict unchanged) and runs each expert through
:func:`~lightning_approxbp.ops.gated_mlp.gated_down_projection`: per expert, only the gate and up
outputs are saved (not the product, nor what the activation keeps), with exact gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_approxbp.conversion.gated_mlp import (
    FusingRule,
    GatedMLPConfig,
    find_activation,
    reproduced,
)
from lightning_approxbp.conversion.rule import ConversionState
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.nn.gated_experts import (
    FusedGatedExperts,
    GatedExpertsSpec,
    run_experts,
)

_PARAMETERS = {"gate_up_proj", "down_proj"}


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
            ours = run_experts(module, spec, x, index, weights, fused=False)
    except Exception:  # noqa: BLE001 - a module that cannot take this call is not this kind of experts
        return False
    return reproduced(expected, ours, weight.dtype)


class GatedExpertsRule(FusingRule):
    """Gated-MLP experts become :class:`~lightning_approxbp.nn.gated_experts.FusedGatedExperts`
    (each expert saves its gate and up outputs only, exact gradients); ``gated_mlp`` turns it on."""

    name = "gated_experts"
    config_type = GatedMLPConfig
    converted = (FusedGatedExperts,)

    def find(self, site: Site, state: ConversionState) -> bool:
        if not self.options(state).gated_mlp:
            return False
        spec, why_not = state.recognise(self.name, site.module, detect_gated_experts)
        if why_not is not None:
            state.report.add(site.fqn, type(site.module).__name__, "skipped", reason=why_not)
        return self.claim(site, spec, state)

    def describe(self, spec: GatedExpertsSpec) -> tuple[str, str]:
        return f"fused gated experts ({spec.activation})", "each expert saves its gate and up outputs only; exact gradients"
