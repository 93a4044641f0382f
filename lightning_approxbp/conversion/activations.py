"""The activation rule: recognise activations by what they compute, not by their class name.

A candidate (a parameter-free leaf module, or a torch function stored as a module attribute,
like ``nn.TransformerEncoderLayer.activation``) is run on a probe tensor that spans negative,
small and large values. It is converted when exactly reproducing one of the exact forwards that
:class:`~lightning_approxbp.nn.StepActivation` implements; ReLU, clipped or unknown
activations match none and are left alone. :class:`ActivationRule` converts the modules and
function attributes so recognised (:meth:`~lightning_approxbp.nn.StepActivation.from_module`),
and reports activations a forward calls as functions (``F.gelu(x)``), which stay exact.

Example::

    >>> from torch import nn
    >>> identify_activation(nn.GELU(approximate="tanh"))
    'gelu_tanh'
    >>> identify_activation(nn.ReLU()) is None
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from lightning_approxbp.activations import ACTIVATIONS, get_activation
from lightning_approxbp.conversion.calls import function_form
from lightning_approxbp.conversion.probe import ProbeRun
from lightning_approxbp.conversion.rule import Candidate, ConversionState, Rule
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.errors import OptionError
from lightning_approxbp.nn import StepActivation
from lightning_approxbp.tables import SUPPORTED_BITS, TABLE_KINDS, StepTable, has_table

# Modules of these packages are reported when left alone, so that the report names them.
ACTIVATION_MODULE_PACKAGES: tuple[str, ...] = ("torch.nn.modules.activation", "transformers.activations")
_RTOL = 1e-5
_ATOL = 1e-5


@cache
def _probe_tensor() -> Tensor:
    values = torch.cat([torch.linspace(-20.0, 20.0, 801), torch.linspace(-1.0, 1.0, 201)])
    return values.view(1, -1)


def identify_activation(candidate: Callable[[Tensor], Tensor]) -> str | None:
    """The activation name whose exact forward ``candidate`` reproduces in fp32, else ``None``."""
    x = _probe_tensor()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = candidate(x.clone())
    except Exception:  # noqa: BLE001 - anything that cannot run on a plain tensor is not an activation
        return None
    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        return None
    for name in ACTIVATIONS:
        if torch.allclose(out, get_activation(name).torch_forward(x), rtol=_RTOL, atol=_ATOL):
            return name
    return None


def is_activation_candidate(module: nn.Module) -> bool:
    """A leaf module without parameters or buffers: cheap and side-effect free to probe."""
    return (
        next(module.children(), None) is None
        and next(module.parameters(recurse=False), None) is None
        and next(module.buffers(recurse=False), None) is None
    )


def looks_like_activation(module: nn.Module) -> bool:
    """Whether the module's class comes from a known activation package (reported if skipped)."""
    return type(module).__module__ in ACTIVATION_MODULE_PACKAGES


def function_attributes(module: nn.Module) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """Torch functions stored as plain attributes (e.g. ``TransformerEncoderLayer.activation``)."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(value) or inspect.isbuiltin(value)):
            continue
        if getattr(value, "__module__", None) in ("torch.nn.functional", "torch._C._nn", "torch"):
            found.append((name, value))
    return found


@dataclass(frozen=True)
class ActivationConfig:
    """The activation rule's options (the same names as in
    :class:`~lightning_approxbp.conversion.config.ConversionConfig`, which documents them)."""

    activations: bool = True
    bits: int = 2
    table: StepTable | str = "fitted"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise OptionError("bits", self.bits, SUPPORTED_BITS)
        if isinstance(self.table, StepTable):
            if self.table.bits != self.bits:
                raise ValueError(
                    f"The table has {self.table.bits} bits but bits={self.bits}; pass bits={self.table.bits}."
                )
        elif self.table not in TABLE_KINDS:
            raise OptionError("table", self.table, TABLE_KINDS, extra="or a StepTable")
        elif self.table == "paper" and self.bits != 2:
            raise ValueError(f"The paper's tables have 2 bits; pass bits=2 or table='fitted' (got bits={self.bits}).")

    def table_for(self, activation: str) -> StepTable | str | None:
        """The table to use for ``activation``, or ``None`` when ``table`` cannot serve it."""
        if isinstance(self.table, StepTable):
            return self.table if self.table.activation == activation else None
        if not has_table(activation, self.bits, self.table):
            return None
        return self.table

    def label(self, activation: str) -> str:
        """How a converted ``activation`` is described in the report."""
        table = self.table_for(activation)
        kind = table if isinstance(table, str) else table.kind
        return f"step {activation} {self.bits}-bit {kind}"


class ActivationRule(Rule):
    """GELU/SiLU-family activations (modules, or torch functions held as attributes) become
    :class:`~lightning_approxbp.nn.StepActivation`: exact forward, ``bits`` per element saved."""

    name = "activation"
    config_type = ActivationConfig
    converted = (StepActivation,)

    def find(self, site: Site, state: ConversionState) -> bool:
        config: ActivationConfig = self.options(state)
        if not config.activations:
            return False
        module = site.module
        candidate = is_activation_candidate(module)
        name = state.structure.recognise(self.name, module, identify_activation) if candidate else None
        if name is not None:
            why = _cannot_convert(site, name, config)
            if why is None:
                state.add(self, Candidate(site, name))
            else:
                state.report.add(site.fqn, type(module).__name__, "skipped", reason=why)
            return True  # its own attributes (e.g. GELUActivation.act) go with it
        dealt = candidate and looks_like_activation(module)
        if dealt:
            reason = f"forward matches none of {', '.join(ACTIVATIONS)}"
            state.report.add(site.fqn, type(module).__name__, "skipped", reason=reason)
        for attribute, function in function_attributes(module):
            name = identify_activation(function)
            if name is not None and config.table_for(name) is not None:
                state.add(self, Candidate(site, name, attribute))
                dealt = True
        return dealt

    def watches_calls(self, state: ConversionState) -> bool:
        return self.options(state).activations

    def traced(self, run: ProbeRun, state: ConversionState) -> None:
        """A row for each activation called as a function inside a forward that nothing converts."""
        covered = {id(c.site.module) for candidates in state.candidates.values() for c in candidates if not c.attribute}
        for module, name in run.activation_calls:
            site = state.site_of.get(id(module))
            if site is None or id(module) in covered or _calls_are_covered(site, state):
                continue
            function, module_form = function_form(name)
            short = function.removeprefix("F.")
            state.report.add(
                f"{site.fqn}.{short}()" if site.fqn else f"{short}()", f"{function} in {type(module).__name__}.forward",
                "skipped", reason=f"left exact: a {name} computed by calling {function} inside forward cannot be "
                f"swapped (only modules and function attributes can); make it a module (self.act = {module_form}) "
                "to convert it",
            )

    def apply(self, plan: Candidate, state: ConversionState) -> None:
        config: ActivationConfig = self.options(state)
        site, name = plan.site, plan.spec
        table = config.table_for(name)
        if plan.attribute is None:
            state.log.replace_site(site, StepActivation.from_module(site.module, name, config.bits, table))
            state.report.add(site.fqn, type(site.module).__name__, "converted", config.label(name))
            return
        function = getattr(site.module, plan.attribute)
        state.log.replace_attribute(site.module, plan.attribute, StepActivation(name, bits=config.bits, table=table))
        label = f"{site.fqn}.{plan.attribute}" if site.fqn else plan.attribute
        kind = f"function {getattr(function, '__name__', plan.attribute)}"
        state.report.add(label, kind, "converted", config.label(name))


def _cannot_convert(site: Site, name: str, config: ActivationConfig) -> str | None:
    if not site.holders:
        return "the root cannot be replaced in place"
    if config.table_for(name) is None:
        return f"table {config.table!r} has no {name} table; use table='fitted'"
    return None


def _calls_are_covered(site: Site, state: ConversionState) -> bool:
    """The calls in this module's forward belong to something with a row of its own: the
    module is an activation, holds one as a function attribute, or was converted."""
    module = site.module
    if state.is_converted(module) or state.is_filtered_out(site):
        return True
    if is_activation_candidate(module) and (
        looks_like_activation(module) or state.structure.recognise("activation", module, identify_activation)
    ):
        return True
    return any(identify_activation(function) is not None for _, function in function_attributes(module))
