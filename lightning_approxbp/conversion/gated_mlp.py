"""The gated MLP rule: recognise gated MLPs (SwiGLU, GeGLU) and fuse their down projection.

A gated MLP computes ``down(act(gate(x)) * up(x))``. It is recognised by **structure** (three
children with ``in_features``/``out_features``: two map the hidden size to an intermediate
size, one maps back; and an activation the registry knows, as a child module or a function
attribute) and confirmed by **probing** (the module's own output on a random input must equal
the formula, which also tells gate from up). No class names are listed, so LLaMA, Mistral,
Qwen2, Gemma, Phi-style and custom MLPs are all found, and LoRA-wrapped gate/up projections too.

A *packed* gated MLP (Phi-3's ``gate_up_proj``) has two children: one projection makes gate and
up side by side (hidden to twice the intermediate size) and the forward splits its output in two
(``chunk`` or slicing); probing tells which half is the gate. Gate and up are then halves of one
tensor, which the product saves anyway, so where such an MLP cannot be fused its activation is
left exact: a step derivative on its own would save nothing there and make gradients approximate.

The replacement, :class:`~lightning_approxbp.nn.gated_mlp.FusedGatedMLP`, keeps the same children under the same names (state
dict unchanged) and runs :func:`~lightning_approxbp.ops.gated_mlp.gated_down_projection`: only
``g`` and ``u`` are saved, and the gradients are exact (not a step derivative).

Example::

    >>> import torch
    >>> from torch import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
    ...         self.down_proj, self.act_fn = nn.Linear(16, 8, bias=False), nn.SiLU()
    ...     def forward(self, x):
    ...         return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    >>> spec, reason = detect_gated_mlp(MLP())
    >>> spec.gate, spec.up, spec.down, spec.activation
    ('gate_proj', 'up_proj', 'down_proj', 'silu')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import permutations
from typing import Any

import torch
from torch import Tensor, nn

from lightning_approxbp.activations import get_activation
from lightning_approxbp.conversion.activations import (
    function_attributes,
    identify_activation,
    is_activation_candidate,
)
from lightning_approxbp.conversion.rule import Candidate, ConversionState, Rule
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.nn.gated_mlp import FusedGatedMLP, GatedMLPSpec, gate_and_up

# Why the activation of a packed gated MLP that is not fused stays exact (see the module docstring).
PACKED_LEFT_EXACT = (
    "; its activation is left exact: gate and up are halves of one tensor, which the product saves anyway, "
    "so a step derivative would save nothing and make gradients approximate"
)


def _projections(module: nn.Module) -> dict[str, nn.Module]:
    return {
        name: child
        for name, child in module.named_children()
        if isinstance(getattr(child, "in_features", None), int) and isinstance(getattr(child, "out_features", None), int)
    }


def find_activation(module: nn.Module) -> tuple[str, str | None] | None:
    """(registry name, child name or ``None`` for a function attribute) of the one activation."""
    found = []
    for name, child in module.named_children():
        if is_activation_candidate(child) and (activation := identify_activation(child)) is not None:
            found.append((activation, name))
    for _, function in function_attributes(module):
        if (activation := identify_activation(function)) is not None:
            found.append((activation, None))
    return found[0] if len(found) == 1 else None


def _formula(spec: GatedMLPSpec, module: nn.Module, x: Tensor) -> Tensor:
    g, u = gate_and_up(spec, module, x)
    return getattr(module, spec.down)(get_activation(spec.activation).torch_forward(g) * u)


def _role_candidates(
    projections: dict[str, nn.Module], activation: tuple[str, str | None]
) -> Iterator[tuple[GatedMLPSpec, int]]:
    """Every assignment of roles the sizes allow, with the hidden size: gate, up and down among
    three projections; or a packed gate-and-up projection (either half the gate) and down among two."""
    sizes = {name: (p.in_features, p.out_features) for name, p in projections.items()}
    if len(projections) == 3:
        for gate, up, down in permutations(projections):
            hidden, intermediate = sizes[gate]
            if sizes[up] == (hidden, intermediate) and sizes[down] == (intermediate, hidden):
                yield GatedMLPSpec(gate, up, down, *activation), hidden
    elif len(projections) == 2:
        for packed, down in permutations(projections):
            hidden, doubled = sizes[packed]
            if doubled % 2 == 0 and sizes[down] == (doubled // 2, hidden):
                for gate_first in (True, False):
                    yield GatedMLPSpec(packed, packed, down, *activation, gate_first=gate_first), hidden


def detect_gated_mlp(
    module: nn.Module, values: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[GatedMLPSpec | None, str | None]:
    """``(spec, None)`` for a fusable gated MLP; ``(None, reason)`` for one that cannot be fused;
    ``(spec, reason)`` for a packed one that cannot be fused (the spec says which activation to
    leave exact); ``(None, None)`` for anything else. ``values`` gives the module to probe (e.g.
    a materialised twin of a module on the meta device); default: ``module`` itself."""
    projections = _projections(module)
    if len(projections) not in (2, 3) or next(module.parameters(recurse=False), None) is not None:
        return None, None
    activation = find_activation(module)
    if activation is None:
        return None, None
    probed = None
    for spec, hidden in _role_candidates(projections, activation):
        if probed is None:
            probed = values(module) if values else module
        if not _reproduces(probed, spec, hidden):
            continue
        down_layer = projections[spec.down]
        if type(down_layer) is not nn.Linear:
            reason = (
                f"its down projection is a {type(down_layer).__module__}.{type(down_layer).__qualname__}, not a "
                "plain torch.nn.Linear: the fused op needs "
                "the weight itself (e.g. a LoRA-wrapped down projection also reads the product)"
            )
            return (spec, reason + PACKED_LEFT_EXACT) if spec.packed else (None, reason)
        return spec, None
    return None, None


def _reproduces(module: nn.Module, spec: GatedMLPSpec, hidden: int) -> bool:
    weight = next(module.parameters(), None)
    if weight is None:
        return False
    x = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            expected, ours = module(x), _formula(spec, module, x)
    except Exception:  # noqa: BLE001 - a module that cannot take this input is not this MLP
        return False
    return reproduced(expected, ours, weight.dtype)


def reproduced(expected: object, ours: Tensor, dtype: torch.dtype) -> bool:
    """A probed module's own output equals the formula's, to the tolerance of its weights' dtype."""
    if not isinstance(expected, Tensor) or expected.shape != ours.shape:
        return False
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(ours, expected, rtol=tolerance, atol=tolerance)


@dataclass(frozen=True)
class GatedMLPConfig:
    """The gated MLP and gated experts rules' option (the same name as in
    :class:`~lightning_approxbp.conversion.config.ConversionConfig`, which documents it)."""

    gated_mlp: bool = True


def activation_inside(module: nn.Module, spec: object) -> list[nn.Module]:
    """The activation child a fused gated MLP (or set of experts) computes exactly, if any."""
    child = getattr(spec, "activation_child", None)
    return [getattr(module, child)] if child is not None else []


class FusingRule(Rule):
    """A rule whose replacement (the one type in :attr:`converted`, built by its ``from_module``)
    computes the activation inside it exactly: that activation is claimed with it, so that no
    later rule converts it on its own."""

    def claim(self, site: Site, spec: object | None, state: ConversionState) -> bool:
        """Record ``site`` (when there is a ``spec`` and it can be replaced) and claim its activation."""
        if spec is None or not site.holders:
            return False
        state.add(self, Candidate(site, spec))
        for module in activation_inside(site.module, spec):
            state.leave_alone(module)
        return True

    def left_alone_inside(self, module: nn.Module) -> Iterable[nn.Module]:
        return activation_inside(module, module.spec)

    def describe(self, spec: Any) -> tuple[str, str]:
        """The report's strategy and reason for a fused ``spec``."""
        raise NotImplementedError

    def apply(self, plan: Candidate, state: ConversionState) -> None:
        (replacement,) = self.converted
        state.log.replace_site(plan.site, replacement.from_module(plan.site.module, plan.spec))
        state.report.add(plan.site.fqn, type(plan.site.module).__name__, "converted", *self.describe(plan.spec))


class GatedMLPRule(FusingRule):
    """Gated MLPs become :class:`~lightning_approxbp.nn.gated_mlp.FusedGatedMLP` (saves gate and
    up outputs only, exact gradients); a packed one that cannot be fused keeps its activation exact."""

    name = "gated_mlp"
    config_type = GatedMLPConfig
    converted = (FusedGatedMLP,)

    def find(self, site: Site, state: ConversionState) -> bool:
        spec, why_not = state.recognise(self.name, site.module, detect_gated_mlp)
        if not self.options(state).gated_mlp:
            if spec is None or not spec.packed:
                return False
            why_not = "gated_mlp=False" + PACKED_LEFT_EXACT
        if why_not is not None:
            state.report.add(site.fqn, type(site.module).__name__, "skipped", reason=f"gated MLP not fused: {why_not}")
            if spec is None:
                return False
            _leave_activation_exact(site, spec, state)  # packed: its activation stays exact too
            return True
        return self.claim(site, spec, state)

    def describe(self, spec: GatedMLPSpec) -> tuple[str, str]:
        if spec.packed:
            halves = "first" if spec.gate_first else "second"
            return f"fused packed gated MLP ({spec.activation})", (
                f"packed: {spec.gate} makes gate ({halves} half) and up, and the forward splits its output; "
                f"saves that output only (not the product, nor what the activation keeps); exact gradients"
            )
        return f"fused gated MLP ({spec.activation})", f"saves the {spec.gate} and {spec.up} outputs only; exact gradients"


def _leave_activation_exact(site: Site, spec: GatedMLPSpec, state: ConversionState) -> None:
    """The activation of a packed gated MLP that is not fused: a row saying why it stays exact."""
    for child in activation_inside(site.module, spec):
        state.leave_alone(child)
        state.report.add(
            f"{site.fqn}.{spec.activation_child}" if site.fqn else spec.activation_child, type(child).__name__,
            "skipped", reason=f"left exact: inside the packed gated MLP {site.fqn or 'at the root'}, which is not "
            "fused (its row says why a step derivative would save nothing there)",
        )
