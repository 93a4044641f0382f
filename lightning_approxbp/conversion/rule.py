"""One technique of a conversion as a rule: what it finds, how it decides, what it swaps in.

A rule is a small stateless object with the same few verbs; the engine
(:mod:`~lightning_approxbp.conversion.engine`) runs an ordered tuple of them over one
:class:`ConversionState` (one call of ``convert``):

1. **find** (:meth:`Rule.find`): for each module, in order, the first rule that deals with it
   records a :class:`Candidate` (or a report row saying why it is left alone);
2. **trace** (:meth:`Rule.traced_norms`, :meth:`Rule.watches_calls`): what the reference probe
   run must watch for this rule; :meth:`Rule.traced` then reads the run;
3. **decide** (:meth:`Rule.decide`): a plan per candidate, from the candidate and the trace;
4. **apply** (:meth:`Rule.apply`): swap the replacement in (through ``state.log``, so it can be
   undone) and add the report rows.

What a rule's replacements are (:attr:`Rule.converted`) makes a module "already converted":
nothing keeps that list by hand. Each rule reads its own part of the
:class:`~lightning_approxbp.conversion.config.ConversionConfig` (:attr:`Rule.config_type`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import nn

from lightning_approxbp.conversion.probe import ProbeRun
from lightning_approxbp.conversion.report import ConversionReport
from lightning_approxbp.conversion.structure import StructureCache
from lightning_approxbp.conversion.walker import ModuleFilter, Site, SwapLog

P = TypeVar("P")


class ComposedConfig(Protocol):
    """What a rule needs of the whole config: its own part."""

    def part(self, kind: type[P]) -> P: ...


@dataclass
class Candidate:
    """Something a rule found to convert.

    Attributes:
        site: the module (and where it is held).
        spec: what the rule recognised it as (a norm form, a gated MLP's roles, an activation name).
        attribute: set when the candidate is a function stored in this attribute of ``site.module``
            rather than the module itself.
    """

    site: Site
    spec: Any = None
    attribute: str | None = None


class Rule:
    """One technique. Subclasses set the class attributes and implement :meth:`find` and :meth:`apply`.

    Attributes:
        name: the technique, as the structure cache and the docs name it.
        config_type: the part of the config this rule reads (:meth:`options`).
        converted: the types of the modules this rule puts in place.
    """

    name: str
    config_type: type[Any]
    converted: tuple[type[nn.Module], ...]

    def options(self, state: ConversionState) -> Any:
        """This rule's part of the conversion's config (a :attr:`config_type`)."""
        return state.part(self.config_type)

    def find(self, site: Site, state: ConversionState) -> bool:
        """Record ``site`` as a candidate (``state.add``) or report why it is left alone; ``True``
        when the site is dealt with, so that later rules do not look at it."""
        raise NotImplementedError

    def left_alone_inside(self, module: nn.Module) -> Iterable[nn.Module]:
        """Modules inside ``module`` (one of :attr:`converted`) that no rule may convert."""
        return ()

    def traced_norms(self, candidates: list[Candidate]) -> dict[nn.Module, int | None]:
        """Norms whose output uses the reference probe run must trace (module -> features)."""
        return {}

    def watches_calls(self, state: ConversionState) -> bool:
        """Whether the reference probe run must watch the activations a forward calls as functions."""
        return False

    def traced(self, run: ProbeRun, state: ConversionState) -> None:
        """Read the reference probe run (e.g. report the activation calls that stay exact)."""

    def decide(self, candidate: Candidate, state: ConversionState) -> Any:
        """The plan for ``candidate`` (default: the candidate itself); may read ``state.reference``."""
        return candidate

    def apply(self, plan: Any, state: ConversionState) -> None:
        """Swap in the replacement that ``plan`` describes and report it."""
        raise NotImplementedError


class ConversionState:
    """What one call of ``convert`` knows and has done, shared by the rules and the engine.

    Attributes:
        root, config, filter: as given to ``convert``.
        rules: the rules, in the engine's order.
        report, log: the report being written; the swaps made (undoable).
        structure: one recognition per structural signature (see
            :class:`~lightning_approxbp.conversion.structure.StructureCache`).
        sites, site_of: every module with its holders, in order; by ``id`` of the module.
        candidates: what each rule found, in site order.
        reference: the reference probe run, once traced (``None`` without a probe).
    """

    def __init__(
        self, root: nn.Module, config: ComposedConfig, module_filter: ModuleFilter | None, rules: tuple[Rule, ...],
        sites: list[Site],
    ) -> None:
        self.root = root
        self.config = config
        self.filter = module_filter
        self.rules = rules
        self.report = ConversionReport()
        self.log = SwapLog()
        self.structure = StructureCache()
        self.sites = sites
        self.site_of = {id(site.module): site for site in sites}
        self.candidates: dict[Rule, list[Candidate]] = {rule: [] for rule in rules}
        self.reference: ProbeRun | None = None
        self._converted = tuple(kind for rule in rules for kind in rule.converted)
        self._left_alone: set[int] = set()
        self._parts: dict[type[Any], Any] = {}

    def part(self, kind: type[P]) -> P:
        """The config's part of type ``kind`` (built once: rules ask for it at every module)."""
        if kind not in self._parts:
            self._parts[kind] = self.config.part(kind)
        return self._parts[kind]

    def recognise(self, name: str, module: nn.Module, detect: Callable[..., Any]) -> Any:
        """``detect(module, values=...)``, once per structure, probing a materialised twin where
        the module has no values."""
        return self.structure.recognise(name, module, lambda m: detect(m, values=self.structure.twin))

    def add(self, rule: Rule, candidate: Candidate) -> None:
        self.candidates[rule].append(candidate)

    def leave_alone(self, module: nn.Module) -> None:
        """No rule converts ``module`` (e.g. the activation a fused gated MLP computes exactly)."""
        self._left_alone.add(id(module))

    def is_left_alone(self, module: nn.Module) -> bool:
        return id(module) in self._left_alone

    def is_converted(self, module: nn.Module) -> bool:
        """``module`` is what some rule puts in place."""
        return isinstance(module, self._converted)

    def is_filtered_out(self, site: Site) -> bool:
        return self.filter is not None and not self.filter(site.module, site.fqn)

    def any_candidates(self) -> bool:
        return any(self.candidates.values())
