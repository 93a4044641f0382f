"""``convert``: turn a model into a lower-memory one in place, exactly, and report what changed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_approxbp._warnings import warn_rank_zero
from lightning_approxbp.activations import ACTIVATIONS
from lightning_approxbp.conversion.activations import (
    function_attributes,
    identify_activation,
    is_activation_candidate,
    looks_like_activation,
)
from lightning_approxbp.conversion.blocks import (
    BlockKind,
    block_kinds,
    block_outputs,
    capture_inputs,
)
from lightning_approxbp.conversion.calls import ActivationCalls, function_form
from lightning_approxbp.conversion.config import ConversionConfig
from lightning_approxbp.conversion.consumers import NormUses
from lightning_approxbp.conversion.fused_loss import LogitsWatch, apply_fused_loss
from lightning_approxbp.conversion.gated_experts import (
    FusedGatedExperts,
    GatedExpertsSpec,
    detect_gated_experts,
)
from lightning_approxbp.conversion.gated_mlp import (
    PACKED_LEFT_EXACT,
    FusedGatedMLP,
    GatedMLPSpec,
    detect_gated_mlp,
)
from lightning_approxbp.conversion.merged import merge_into, share_input_of
from lightning_approxbp.conversion.norms import (
    ConvertedNorm,
    NormSpec,
    build_converted_norm,
    detect_norm,
    gamma,
    why_not_a_norm,
)
from lightning_approxbp.conversion.probe import (
    ProbeFn,
    ProbeRun,
    default_tolerance,
    max_relative_error,
    probe_from_example,
    run_probe,
)
from lightning_approxbp.conversion.report import ConversionReport
from lightning_approxbp.conversion.sharded import (
    convert_sharded,
    describe,
    sharded_modules,
    why_not_convertible,
)
from lightning_approxbp.conversion.structure import (
    StructureCache,
    has_no_values,
    materialized_twin,
)
from lightning_approxbp.conversion.walker import ModuleFilter, Site, SwapLog, sites
from lightning_approxbp.errors import ProbeError
from lightning_approxbp.nn import RegeneratedDropout, StepActivation
from lightning_approxbp.nn.shared_input import SHARED_INPUT_TYPES

T = TypeVar("T")

# Up to this many blocks of one kind, the whole model's output is compared too.
_WHOLE_MODEL_MAX_REPEATS = 4
_NO_PROBE_NOTE = (
    "no probe batch: the uses of norm outputs were not traced, so no affine was merged (norms with safe "
    "weights keep their affine), the output was not verified and saved bytes were not measured. Pass "
    "example_input (or set example_input_array) for the full conversion."
)

_SHARDED_NOTE = (
    "converted after fully_shard: decided on a meta-device copy of the model (nothing gathered), then the "
    "replacements were given the sharded parameters and FSDP2 was pointed at them."
)


@dataclass
class _NormCandidate:
    site: Site
    spec: NormSpec
    uses: NormUses | None = None


@dataclass
class _Decision:
    strategy: str | None  # None: skip
    dtype_policy: str = "input"
    # merge: the linear layers that take the affine; otherwise: those that share the output
    consumers: list[nn.Module] = field(default_factory=list)
    reason: str = ""


def _is_converted(module: nn.Module) -> bool:
    converted = (StepActivation, ConvertedNorm, FusedGatedMLP, FusedGatedExperts, RegeneratedDropout, *SHARED_INPUT_TYPES)
    return isinstance(module, converted)


def _features(spec: NormSpec) -> int | None:
    """The norm's feature count when it normalises the last axis only (what a linear layer
    reads, so its affine can move there); ``None`` for several axes or channels first."""
    return spec.normalized_shape[0] if len(spec.normalized_shape) == 1 and not spec.channels_first else None


def _min_abs_gamma(norm: nn.Module, offset: float) -> float | None:
    scale = gamma(norm, offset)
    return None if scale is None or scale.numel() == 0 or scale.is_meta else scale.abs().min().item()


def decide(candidate: _NormCandidate, config: ConversionConfig) -> _Decision:
    """Choose the affine strategy and output dtype policy of one norm (see ConversionConfig.affine)."""
    spec, uses = candidate.spec, candidate.uses
    traced = uses is not None and uses.called
    linear_only = traced and uses.all_linear
    dtype_policy = "autocast" if linear_only else "input"
    sharing = uses.consumers if traced and config.share_norm_output else []
    if not (spec.has_weight or spec.has_bias):
        return _Decision("plain", dtype_policy, sharing, reason="no affine parameters: exact")
    blockers = "" if not traced else ", ".join(uses.blockers()[:4])
    if traced and uses.all_mergeable and _features(spec) is not None:
        merge_reason = f"affine applied in {len(uses.consumers)} consumer(s): exact"
        merge = _Decision("merge", "autocast", uses.consumers, merge_reason)
    elif not traced:
        merge = _Decision(None, reason="uses not traced (no probe batch)" if uses is None else "not called by the probe")
    else:
        merge = _Decision(None, reason=f"output also used by {blockers}")
    if config.affine == "merge" or (config.affine == "auto" and merge.strategy):
        return merge
    smallest = _min_abs_gamma(candidate.site.module, spec.offset)
    if smallest is not None and smallest < config.min_keep_weight:
        reason = f"min |weight| = {smallest:.1e} < min_keep_weight = {config.min_keep_weight:g}: output recovery unsafe"
        return _Decision(None, reason=reason if config.affine == "keep" else f"{merge.reason}; {reason}")
    keep_reason = "affine kept (forced)" if config.affine == "keep" else f"{merge.reason}; affine kept"
    if smallest is not None:
        keep_reason += f", min |weight| = {smallest:.2g}"
    elif spec.has_weight and candidate.site.module.weight.is_meta:
        keep_reason += ", min |weight| checked at the first forward with real weights"
    if dtype_policy == "input":
        keep_reason += "; emits its input dtype under autocast (output feeds more than linear layers)"
    return _Decision("keep", dtype_policy, sharing, reason=keep_reason)


class _Conversion:
    """One call of :func:`convert`: collect candidates, trace, decide, swap, verify."""

    def __init__(self, root: nn.Module, config: ConversionConfig, module_filter: ModuleFilter | None) -> None:
        self.root = root
        self.config = config
        self.filter = module_filter
        self.report = ConversionReport()
        self.log = SwapLog()
        self.structure = StructureCache()
        self.sites = list(sites(root))
        self.site_of = {id(site.module): site for site in self.sites}
        self.norms: list[_NormCandidate] = []
        self.activations: list[tuple[Site, str]] = []
        self.function_activations: list[tuple[Site, str, str]] = []
        self.gated_mlps: list[tuple[Site, GatedMLPSpec | GatedExpertsSpec]] = []
        self.dropouts: list[Site] = []
        # Activations computed exactly inside a fused gated MLP: not converted on their own.
        self.fused_activations: set[int] = set()

    # ----------------------------------------------------------------------- collect
    def collect(self) -> None:
        for site in self.sites:
            module = site.module
            if id(module) in self.fused_activations:
                continue
            if _is_converted(module):
                self.report.add(site.fqn, type(module).__name__, "unchanged", reason="already converted")
                if isinstance(module, (FusedGatedMLP, FusedGatedExperts)):
                    self._skip_fused_activation(module, module.spec)
                continue
            if self.filter is not None and not self.filter(module, site.fqn):
                continue
            if self._add_gated_mlp(site):
                continue
            if self.config.dropout and type(module) is nn.Dropout:
                if module.p > 0 and site.holders:
                    self.dropouts.append(site)
                continue
            if self.config.norms and (spec := self._recognise("norm", module, detect_norm)) is not None:
                self._add_norm(site, spec)
            elif self.config.norms and (reason := why_not_a_norm(module)) is not None:
                self.report.add(site.fqn, type(module).__name__, "skipped", reason=reason)
            elif self.config.activations:
                self._add_activation(site)

    def _recognise(self, name: str, module: nn.Module, detect: Callable[..., Any]) -> Any:
        """``detect(module)``, once per structure, probing a materialised twin where there are no values."""
        return self.structure.recognise(name, module, lambda m: detect(m, values=self.structure.twin))

    def _add_gated_mlp(self, site: Site) -> bool:
        """Record a fusable gated MLP or set of gated experts, or leave a packed gated MLP that
        cannot be fused exact (True: the site is dealt with); report why one cannot be fused."""
        spec, why_not = self._recognise("gated_mlp", site.module, detect_gated_mlp)
        kind = type(site.module).__name__
        if not self.config.gated_mlp:
            if spec is None or not spec.packed:
                return False
            why_not = "gated_mlp=False" + PACKED_LEFT_EXACT
        if why_not is not None:
            self.report.add(site.fqn, kind, "skipped", reason=f"gated MLP not fused: {why_not}")
            if spec is not None:  # packed: its activation stays exact too
                self._leave_activation_exact(site, spec)
                return True
        if spec is None and why_not is None:
            spec, why_not = self._recognise("gated_experts", site.module, detect_gated_experts)
            if why_not is not None:
                self.report.add(site.fqn, kind, "skipped", reason=why_not)
        if spec is None or not site.holders:
            return False
        self.gated_mlps.append((site, spec))
        self._skip_fused_activation(site.module, spec)
        return True

    def _leave_activation_exact(self, site: Site, spec: GatedMLPSpec) -> None:
        """The activation of a packed gated MLP that is not fused: a row saying why it stays exact."""
        self._skip_fused_activation(site.module, spec)
        if spec.activation_child is not None:
            child = getattr(site.module, spec.activation_child)
            self.report.add(
                f"{site.fqn}.{spec.activation_child}" if site.fqn else spec.activation_child, type(child).__name__,
                "skipped", reason=f"left exact: inside the packed gated MLP {site.fqn or 'at the root'}, which is not "
                "fused (its row says why a step derivative would save nothing there)",
            )

    def _skip_fused_activation(self, mlp: nn.Module, spec: GatedMLPSpec | GatedExpertsSpec) -> None:
        if spec.activation_child is not None:
            self.fused_activations.add(id(getattr(mlp, spec.activation_child)))

    def _add_norm(self, site: Site, spec: NormSpec) -> None:
        if not site.holders:
            self.report.add(site.fqn, type(site.module).__name__, "skipped", reason="the root cannot be replaced in place")
        else:
            self.norms.append(_NormCandidate(site, spec))

    def _add_activation(self, site: Site) -> None:
        module = site.module
        name = self.structure.recognise("activation", module, identify_activation) if is_activation_candidate(module) else None
        if name is not None:
            why = self._cannot_convert_activation(site, name)
            if why is None:
                self.activations.append((site, name))
            else:
                self.report.add(site.fqn, type(module).__name__, "skipped", reason=why)
            return  # its own attributes (e.g. GELUActivation.act) go with it
        if is_activation_candidate(module) and looks_like_activation(module):
            reason = f"forward matches none of {', '.join(ACTIVATIONS)}"
            self.report.add(site.fqn, type(module).__name__, "skipped", reason=reason)
        for attribute, function in function_attributes(module):
            name = identify_activation(function)
            if name is not None and self.config.table_for(name) is not None:
                self.function_activations.append((site, attribute, name))

    def _cannot_convert_activation(self, site: Site, name: str) -> str | None:
        if not site.holders:
            return "the root cannot be replaced in place"
        if self.config.table_for(name) is None:
            return f"table {self.config.table!r} has no {name} table; use table='fitted'"
        return None

    # ----------------------------------------------------------------------- probe + decide
    def trace(self, probe: ProbeFn, compute_free: bool = False) -> ProbeRun:
        """The reference probe run: where each norm's output goes, and which activations are
        called as functions (reported as left exact)."""
        norms = {c.site.module: _features(c.spec) for c in self.norms} if self.norms else None
        run = run_probe(
            self.root, probe, trace_norms=norms, compute_free=compute_free, watch_activations=self.config.activations
        )
        for candidate in self.norms:
            candidate.uses = run.norm_uses[candidate.site.module]
        return run

    def report_activation_calls(self, calls: ActivationCalls) -> None:
        """A row for each activation called as a function inside a forward that nothing converts."""
        covered = {id(site.module) for site, _ in self.gated_mlps}
        for module, name in calls:
            site = self.site_of.get(id(module))
            if site is None or id(module) in covered or self._calls_are_covered(site):
                continue
            function, module_form = function_form(name)
            short = function.removeprefix("F.")
            self.report.add(
                f"{site.fqn}.{short}()" if site.fqn else f"{short}()", f"{function} in {type(module).__name__}.forward",
                "skipped", reason=f"left exact: a {name} computed by calling {function} inside forward cannot be "
                f"swapped (only modules and function attributes can); make it a module (self.act = {module_form}) "
                "to convert it",
            )

    def _calls_are_covered(self, site: Site) -> bool:
        """The calls in this module's forward belong to something with a row of its own: the
        module is an activation, holds one as a function attribute, or was converted."""
        module = site.module
        if _is_converted(module) or (self.filter is not None and not self.filter(module, site.fqn)):
            return True
        if is_activation_candidate(module) and (
            looks_like_activation(module) or self.structure.recognise("activation", module, identify_activation)
        ):
            return True
        return any(identify_activation(function) is not None for _, function in function_attributes(module))

    def apply(self) -> None:
        for site, name in self.activations:
            self.log.replace_site(site, StepActivation.from_module(site.module, name, self.config.bits, self.config.table_for(name)))
            self.report.add(site.fqn, type(site.module).__name__, "converted", self._step_label(name))
        for site in self.dropouts:
            self.log.replace_site(site, RegeneratedDropout.from_module(site.module))
            self.report.add(site.fqn, "Dropout", "converted", "mask redrawn in backward", "saves no mask; same masks")
        for site, attribute, name in self.function_activations:
            function = getattr(site.module, attribute)
            self.log.replace_attribute(site.module, attribute, self._step(name))
            label = f"{site.fqn}.{attribute}" if site.fqn else attribute
            kind = f"function {getattr(function, '__name__', attribute)}"
            self.report.add(label, kind, "converted", self._step_label(name))
        for candidate in self.norms:
            self._apply_norm(candidate)
        # After the norms: a merged gate/up projection is then the child the fused MLP holds.
        for site, spec in self.gated_mlps:
            kind = type(site.module).__name__
            if isinstance(spec, GatedExpertsSpec):
                self.log.replace_site(site, FusedGatedExperts.from_module(site.module, spec))
                self.report.add(site.fqn, kind, "converted", f"fused gated experts ({spec.activation})",
                                "each expert saves its gate and up outputs only; exact gradients")
                continue
            self.log.replace_site(site, FusedGatedMLP.from_module(site.module, spec))
            if spec.packed:
                strategy = f"fused packed gated MLP ({spec.activation})"
                halves = "first" if spec.gate_first else "second"
                why = (f"packed: {spec.gate} makes gate ({halves} half) and up, and the forward splits its output; "
                       f"saves that output only (not the product, nor what the activation keeps); exact gradients")
            else:
                strategy = f"fused gated MLP ({spec.activation})"
                why = f"saves the {spec.gate} and {spec.up} outputs only; exact gradients"
            self.report.add(site.fqn, kind, "converted", strategy, why)
        order = {site.fqn: index for index, site in enumerate(self.sites)}
        self.report.rows.sort(key=lambda row: order.get(row.fqn, order.get(row.fqn.rpartition(".")[0], len(order))))

    def _apply_norm(self, candidate: _NormCandidate) -> None:
        site, spec = candidate.site, candidate.spec
        decision = decide(candidate, self.config)
        kind = f"{type(site.module).__name__}"
        if decision.strategy is None:
            self.report.add(site.fqn, kind, "skipped", reason=decision.reason)
            self._report_readers(candidate, decision)
            return
        new = build_converted_norm(
            site.module, spec, decision.strategy, decision.dtype_policy, min_keep_weight=self.config.min_keep_weight
        )
        self.log.replace_site(site, new)
        layout = " channels-first" if spec.channels_first else ""
        strategy = f"{spec.kind}{layout} {decision.strategy}, output={decision.dtype_policy}"
        self.report.add(site.fqn, kind, "converted", strategy, decision.reason)
        for consumer in decision.consumers:
            consumer_site = self.site_of[id(consumer)]
            if decision.strategy == "merge":
                replacement, strategy = merge_into(consumer, new), f"applies affine of {site.fqn}"
            else:
                replacement, strategy = share_input_of(consumer), f"saves the output of {site.fqn}, no copy"
            self.log.replace_site(consumer_site, replacement)
            self.report.add(consumer_site.fqn, type(consumer).__name__, "converted", strategy)
        self._report_readers(candidate, decision)

    def _report_readers(self, candidate: _NormCandidate, decision: _Decision) -> None:
        """A row for every layer that reads the norm's output but was left as it was, saying why."""
        uses, norm_fqn = candidate.uses, candidate.site.fqn
        if uses is None:
            return
        changed = {self.site_of[id(consumer)].fqn for consumer in decision.consumers}
        if decision.strategy is None:
            why = f"reads the output of {norm_fqn}, which was skipped: keeps its own input copy"
        elif not self.config.share_norm_output and decision.strategy != "merge":
            why = f"reads the output of {norm_fqn}; share_norm_output=False: keeps its own input copy"
        else:
            why = f"reads the output of {norm_fqn} together with other inputs: keeps its own input copy"
        readers = [(fqn, why) for fqn in uses.layer_readers if fqn not in changed]
        readers += [
            (fqn, f"reads the output of {norm_fqn} through {dropout} (a new tensor while training), which no "
                  "other layer saves: keeps its own input copy")
            for fqn, dropout in dict.fromkeys(uses.through_dropout)
        ]
        listed = {row.fqn for row in self.report.rows}
        for fqn, why in readers:
            if fqn and fqn not in listed:
                listed.add(fqn)
                self.report.add(fqn, type(self.root.get_submodule(fqn)).__name__, "skipped", reason=why)

    def _step(self, name: str) -> StepActivation:
        return StepActivation(name, bits=self.config.bits, table=self.config.table_for(name))

    def _step_label(self, name: str) -> str:
        table = self.config.table_for(name)
        kind = table if isinstance(table, str) else table.kind
        return f"step {name} {self.config.bits}-bit {kind}"

    # ----------------------------------------------------------------------- verify
    def prepare_block_checks(self, kinds: list[BlockKind]) -> list[_BlockCheck]:
        """Before the swap: each block kind's inputs and its representative's reference output.

        A representative without values is checked on a materialised twin (random weights).
        """
        checks = []
        for kind in kinds:
            if kind.inputs is None:
                continue  # not called by the probe: nothing it computes was traced either
            representative = kind.representative.module
            twin = materialized_twin(representative) if has_no_values(representative) else None
            device = next((twin or representative).parameters(), torch.empty(0)).device
            inputs = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, kind.draw_inputs())
            checks.append(_BlockCheck(kind, inputs, twin, block_outputs(twin or representative, inputs)))
        return checks

    def verify_blocks(self, checks: list[_BlockCheck]) -> None:
        """After the swap: every block kind's representative computes what it computed before
        (a twin is converted on its own first, with this conversion's options)."""
        for check in checks:
            fqn = check.kind.representative.fqn
            where = f"the output of {fqn} and the {len(check.kind.members) - 1} other blocks of its kind"
            if check.twin is not None:
                args, kwargs = check.inputs
                convert(check.twin, probe=lambda m: m(*args, **kwargs), config=replace(self.config, verify=False))
                block = check.twin
                where += f" (checked on a copy of {fqn} with random weights)"
            else:
                current = check.kind.representative.holders[0]
                block = getattr(*current) if current else self.root
            error, index = max_relative_error(check.reference, block_outputs(block, check.inputs))
            self.report.max_error = max(self.report.max_error or 0.0, error)
            tolerance = self._tolerance(check.reference, block)
            if error > tolerance:
                self._refuse(error, index, tolerance, where=where)

    def _tolerance(self, outputs: list[Tensor], module: nn.Module) -> float:
        dtypes = [t.dtype for t in outputs] + [p.dtype for p in module.parameters()]
        return self.config.tolerance or max((default_tolerance(d) for d in dtypes), default=1e-4)

    def _refuse(self, error: float, index: int, tolerance: float, where: str) -> None:
        changed = ", ".join(row.fqn for row in self.report.converted[:8])
        more = len(self.report.converted) - 8
        self.log.undo_all()
        raise RuntimeError(
            f"ApproxBP conversion changed {where}: max relative difference {error:.3e} at output {index} "
            f"exceeds the tolerance {tolerance:.1e}. The model was left unconverted. Converted modules were: "
            f"{changed}{f' and {more} more' if more > 0 else ''}. Exclude the culprit with filter=..., or pass "
            "verify=False to accept the difference."
        )

    def verify(self, reference: ProbeRun, converted: ProbeRun) -> None:
        """The whole model's output on the probe batch is what it was."""
        error, index = max_relative_error(reference.outputs, converted.outputs)
        tolerance = self._tolerance(reference.outputs, self.root)
        self.report.max_error = max(self.report.max_error or 0.0, error)
        if error > tolerance:
            self._refuse(error, index, tolerance, where="the model output")


@dataclass
class _BlockCheck:
    kind: BlockKind
    inputs: tuple[tuple[Any, ...], dict[str, Any]]
    twin: nn.Module | None  # a materialised copy, for a representative without values
    reference: list[Tensor]  # what the representative (or its twin) computed before conversion


def _to_meta(leaf: Any) -> Any:
    return leaf.to("meta") if isinstance(leaf, Tensor) else leaf


class _ProbeRunner:
    """Runs the probe on fake tensors while that works, else on real ones: a forward that needs
    values fails on fake tensors once, and every later run goes straight to real tensors (on the
    meta device, real means meta tensors, which suits some models better)."""

    def __init__(self, compute_free: bool) -> None:
        self.compute_free = compute_free

    def __call__(self, run: Callable[[bool], T]) -> T:
        if self.compute_free:
            try:
                return run(True)
            except Exception:  # noqa: BLE001 - e.g. a data-dependent branch or `.item()` in the model's forward
                self.compute_free = False
        return run(False)


def _whole_model_note(has_values: bool, kinds: list[BlockKind]) -> str:
    why = (
        "its parameters are on the meta device (no values)"
        if not has_values
        else f"its error would grow with depth ({max(len(kind.members) for kind in kinds)} repeated blocks)"
    )
    return f"whole-model output not compared: {why}; each block kind was verified on its first member instead."


def convert(
    module: nn.Module,
    example_input: Any = None,
    *,
    config: ConversionConfig | None = None,
    filter: ModuleFilter | None = None,  # noqa: A002 - the public name users expect
    probe: ProbeFn | None = None,
    probe_label: str | None = None,
    **options: Any,
) -> ConversionReport:
    """Convert activations and norms of ``module`` in place; return what was done.

    GELU/SiLU-family activations become step-derivative ones (exact forward, ``bits`` per
    element saved). LayerNorm/RMSNorm modules become memory-sharing ones (they save their output,
    which the next layer saves anyway); their affine is merged into the consuming linear layers
    when every use of the norm output is one (exact forward and gradients, state dict unchanged),
    else kept with output-based recovery when ``|weight|`` is safe, else the norm is skipped.
    Calling ``convert`` again changes nothing.

    Args:
        module: the model; converted in place (the root module itself is never replaced).
        example_input: one batch as ``forward`` takes it: a tensor, a tuple of positional
            arguments or a dict of keyword arguments. Needed to merge affines, verify the
            output and measure saved bytes.
        config: what to convert and how (a
            :class:`~lightning_approxbp.conversion.config.ConversionConfig`); default: the
            defaults of its fields, overridden by ``options``.
        options: the fields of ``ConversionConfig`` as keywords (``activations``, ``norms``,
            ``gated_mlp``, ``dropout``, ``share_norm_output``, ``bits``, ``table``, ``affine``,
            ``fused_loss``, ``verify``, ``min_keep_weight``, ``tolerance``), instead of ``config``.
        filter: ``(module, fqn) -> bool``; only norms and activations for which it returns
            ``True`` are considered.
        probe: instead of ``example_input``, a function that runs the model once the way
            training does (e.g. ``lambda m: m.training_step(batch, 0)``).
        probe_label: how the probe is described in the report.

    Returns:
        The :class:`~lightning_approxbp.conversion.report.ConversionReport`.

    Raises:
        ValueError: for conflicting or unknown options, or a model sharded by FSDP1 or tensor
            parallelism (convert first, then shard). A model sharded with FSDP2's ``fully_shard``
            is converted: decided on a meta-device copy, its replacements hold the sharded
            parameters (see :mod:`~lightning_approxbp.conversion.sharded`).
        ProbeError: (a ``ValueError``) when the model rejects ``example_input`` (or ``probe``
            fails); the model's own error is chained and the model is unchanged.
        RuntimeError: if ``verify`` finds a different output (the model is then left unconverted).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        >>> report = convert(model, torch.randn(4, 16))
        >>> [row.action for row in report.rows]
        ['converted', 'converted', 'converted']
        >>> report.bytes_after < report.bytes_before
        True
    """
    config = ConversionConfig.build(config, **options)
    if example_input is not None and probe is not None:
        raise ValueError("Pass either example_input or probe, not both.")
    sharded = sharded_modules(module)
    if sharded:
        why = why_not_convertible(module)
        if why is not None:
            raise ValueError(
                f"convert() must run before sharding here: {describe(sharded)} are sharded and {why}, which keeps "
                "per-module state that replaced modules would break. Call convert(model, example_input) first, "
                "then shard (fully_shard / FSDP / parallelize_module)."
            )

        def convert_skeleton(skeleton: nn.Module) -> ConversionReport:
            return convert(skeleton, example_input, config=config, filter=filter, probe=probe, probe_label=probe_label)

        report = convert_sharded(module, convert_skeleton)
        report.notes.append(_SHARDED_NOTE)
        return report
    has_values = not has_no_values(module)
    if probe is None and example_input is not None:
        # A model without values runs on meta inputs (shapes only), whatever device the batch is on.
        inputs = example_input if has_values else tree_map(_to_meta, example_input)
        probe = probe_from_example(inputs)
        probe_label = probe_label or "example_input"
    # The fused loss ("auto") watches the probe runs for reads of the logits; only a training step shows them.
    watch = LogitsWatch(module) if config.fused_loss == "auto" and probe is not None and example_input is None else None
    probe = watch.wrap(probe) if watch is not None else probe
    conversion = _Conversion(module, config, filter)
    report = conversion.report
    report.probe = probe_label or ("custom" if probe is not None else "none")
    conversion.collect()
    others = (conversion.activations, conversion.function_activations, conversion.gated_mlps, conversion.dropouts)
    kinds = block_kinds(conversion.sites, conversion.structure)
    # The whole output is compared where that is cheap and meaningful: a model with values and
    # few repeated blocks (its error grows with depth, and each block kind is checked anyway).
    # Unverified (e.g. the twin of a block kind, converted only to be compared), nothing needs values.
    whole_model_check = (
        config.verify and has_values and all(len(kind.members) <= _WHOLE_MODEL_MAX_REPEATS for kind in kinds)
    )
    # Without a whole-model comparison, the probe only traces and counts: fake tensors do that
    # without the arithmetic, and transformers skips its data-dependent checks on them (a model
    # whose forward needs values runs as it is instead).
    runner = _ProbeRunner(compute_free=not (whole_model_check and config.verify))

    def reference_run(compute_free: bool) -> ProbeRun | None:
        with capture_inputs(kinds):
            if probe is not None and (conversion.norms or any(others) or config.activations):
                return conversion.trace(probe, compute_free)
        return None

    try:
        reference = runner(reference_run)
    except Exception as error:
        raise ProbeError(report.probe, error) from error
    if reference is not None and not any(t.numel() for t in reference.outputs):
        raise ValueError(
            f"ApproxBP: the probe ({report.probe}) produced no output elements (an empty batch?), so nothing "
            "could be traced or verified. Pass a batch with at least one sample; the model was not changed."
        )
    if reference is not None:
        conversion.report_activation_calls(reference.activation_calls)
    candidates = bool(conversion.norms or any(others))
    block_checks = conversion.prepare_block_checks(kinds) if reference is not None and config.verify and candidates else []
    conversion.apply()
    if probe is None:
        if conversion.norms:
            report.notes.append(_NO_PROBE_NOTE)
    elif reference is not None and not report.converted:
        # Nothing changed: the reference run measured the model as it stays, so it is not run again.
        report.bytes_before = report.bytes_after = reference.saved_bytes
    elif reference is not None:
        # The second run measures the converted model's saved bytes (on fake tensors where no
        # value is compared) and gives the whole-model output that verification compares.
        try:
            converted = runner(lambda free: run_probe(module, probe, compute_free=free))
        except Exception as error:
            conversion.log.undo_all()
            raise RuntimeError(
                "ApproxBP: the converted model failed on the probe batch; the model was left unconverted."
            ) from error
        report.bytes_before, report.bytes_after = reference.saved_bytes, converted.saved_bytes
        if config.verify:
            conversion.verify_blocks(block_checks)
            if whole_model_check:
                conversion.verify(reference, converted)
            else:
                report.notes.append(_whole_model_note(has_values, kinds))
    if config.fused_loss:
        # Last, after verification: it changes the model's outputs (logits=None), so it checks its
        # loss on its own. Only a training-step probe can show whether the logits are read.
        apply_fused_loss(module, probe if example_input is None else None, config.fused_loss, report, watch)
    if not report.rows or not (report.converted or any(r.action == "unchanged" for r in report.rows)):
        warn_rank_zero(
            f"ApproxBP: nothing to convert in {type(module).__name__} (no GELU/SiLU-family activation or "
            "LayerNorm/RMSNorm that can be converted exactly); the model is unchanged."
        )
    return report
