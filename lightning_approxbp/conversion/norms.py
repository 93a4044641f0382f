"""The norm rule: recognise LayerNorm / RMSNorm modules, decide their affine strategy, swap in
memory-sharing ones (and the consumer layers that merge or share their output).

``nn.LayerNorm`` and ``nn.RMSNorm`` are read directly. Other norms (the RMSNorm classes of
Llama, Mistral, Qwen2, T5, Gemma's ``(1 + w)`` form, custom LayerNorms) are recognised by
structure: a 1-D ``weight`` (and optional ``bias``) as their whole state, and an ``eps`` or
``variance_epsilon`` attribute; an affine-free one by its ``eps`` and ``normalized_shape``
attributes. Each candidate form (RMS, RMS with ``1 + w``, centred) is then checked numerically
against the module's own output, over the last axis and then over dim 1 of an ``N, C, H, W``
input (channels first, as ConvNeXt's LayerNorm with ``data_format="channels_first"``); a module
that matches none is left alone, and :func:`why_not_a_norm` says whether its structure or its
numerics ruled it out.

Per norm, :func:`decide` picks the affine strategy from where the probe saw its output go (see
``ConversionConfig.affine``); :class:`NormRule` then swaps the norm and its consumer layers
(:mod:`~lightning_approxbp.conversion.merged`): they are one technique, since which consumers
change is the norm's decision.

The replacements (:class:`~lightning_approxbp.nn.norm.ConvertedLayerNorm`,
:class:`~lightning_approxbp.nn.norm.ConvertedRMSNorm`) keep the original ``weight``/``bias``
Parameter objects under the same names, so state dicts, optimiser state and checkpoints are
unchanged.

Example::

    >>> from torch import nn
    >>> spec = detect_norm(nn.LayerNorm(8))
    >>> spec.centered, spec.normalized_shape
    (True, (8,))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from lightning_approxbp.conversion.consumers import NormUses
from lightning_approxbp.conversion.merged import merge_into, share_input_of
from lightning_approxbp.conversion.rule import Candidate, ConversionState, Rule
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.errors import OptionError
from lightning_approxbp.functional import ms_layer_norm, ms_rms_norm
from lightning_approxbp.nn.norm import (
    DEFAULT_MIN_KEEP_WEIGHT,
    ConvertedLayerNorm,
    ConvertedNorm,
    ConvertedRMSNorm,
    NormSpec,
    resolve_eps,
)
from lightning_approxbp.nn.shared_input import SHARED_INPUT_TYPES

AFFINE_STRATEGIES: tuple[str, ...] = ("auto", "merge", "keep")
_EPS_ATTRIBUTES: tuple[str, ...] = ("eps", "variance_epsilon")
_CANDIDATE_FORMS: tuple[tuple[bool, float], ...] = ((False, 0.0), (False, 1.0), (True, 0.0))


def _spec_layer_norm(module: nn.Module) -> NormSpec | None:
    return NormSpec(
        tuple(module.normalized_shape), module.eps, True, 0.0, module.weight is not None, module.bias is not None
    )


def _spec_rms_norm(module: nn.Module) -> NormSpec | None:
    eps = None if module.eps is None else float(module.eps)
    return NormSpec(tuple(module.normalized_shape), eps, False, 0.0, module.weight is not None, False)


# Exact types read directly; anything else goes through the structural check.
_KNOWN_NORMS = {nn.LayerNorm: _spec_layer_norm, nn.RMSNorm: _spec_rms_norm}


def _eps(module: nn.Module) -> float | None:
    return next((getattr(module, a) for a in _EPS_ATTRIBUTES if isinstance(getattr(module, a, None), float)), None)


def _declared_shape(module: nn.Module) -> tuple[int, ...] | None:
    """An affine-free norm's ``normalized_shape`` attribute (an int or a tuple of ints)."""
    shape = getattr(module, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else shape
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(n, int) and n > 0 for n in shape):
        return tuple(shape)
    return None


def structure_problem(module: nn.Module) -> str | None:
    """Why ``module``'s structure is not a norm's (``None`` when it could be one).

    A norm is a leaf whose whole state is a 1-D ``weight`` (and a ``bias`` of its shape), or
    nothing at all with a ``normalized_shape`` attribute (no weight to read the size from), and
    that has a float ``eps`` or ``variance_epsilon``.
    """
    if next(module.children(), None) is not None:
        return "it has child modules (a norm is a leaf)"
    state = dict(module.named_parameters(recurse=False))
    if set(state) - {"weight", "bias"}:
        return f"it has parameters other than weight and bias ({', '.join(sorted(set(state) - {'weight', 'bias'}))})"
    if next(module.buffers(), None) is not None:
        return "it has buffers (a norm's whole state is its weight and bias)"
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None and bias is not None:
        return "it has a bias but no weight"
    if weight is not None and weight.dim() != 1:
        return f"its weight is {weight.dim()}-D, not 1-D"
    if bias is not None and bias.shape != weight.shape:
        return "its bias and weight have different shapes"
    if weight is None and _declared_shape(module) is None:
        return "it has no weight and no normalized_shape attribute, so the normalised size is unknown"
    if _eps(module) is None:
        return f"it has no float {' or '.join(_EPS_ATTRIBUTES)} attribute"
    return None


def _structural_spec(module: nn.Module, centered: bool, offset: float) -> NormSpec | None:
    if structure_problem(module) is not None:
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None:
        # Affine-free: the offset only scales an affine that is not there.
        shape = _declared_shape(module)
        return None if offset else NormSpec(shape, _eps(module), centered, 0.0, False, False)  # type: ignore[arg-type]
    centered = centered or bias is not None
    return NormSpec((weight.numel(),), _eps(module), centered, 0.0 if bias is not None else offset, True, bias is not None)


def reference_output(spec: NormSpec, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What the memory-sharing op computes for ``spec`` (no autograd)."""
    with torch.no_grad():
        eps = resolve_eps(spec.eps, x)
        if spec.centered:
            return ms_layer_norm(x, spec.normalized_shape, weight, bias, eps)
        return ms_rms_norm(x, spec.normalized_shape, weight, eps, offset=spec.offset)


def _probe_input(spec: NormSpec, dtype: torch.dtype, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (2, spec.normalized_shape[0], 3, 4) if spec.channels_first else (2, 5, *spec.normalized_shape)
    return torch.randn(shape, generator=generator).mul_(3).add_(1.5).to(device, dtype)


def _matches(module: nn.Module, spec: NormSpec) -> bool:
    weight = getattr(module, "weight", None) if spec.has_weight else None
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    x = _probe_input(spec, dtype, device)
    # The comparison is of formulas, not of whatever autocast the caller converts under.
    with torch.autocast(device.type, enabled=False):
        try:
            with torch.no_grad():
                expected = module(x)
        except Exception:  # noqa: BLE001 - a module that cannot take this input is not a norm of this shape
            return False
        if not isinstance(expected, Tensor) or expected.shape != x.shape:
            return False
        bias = getattr(module, "bias", None) if spec.has_bias else None
        if spec.channels_first:
            ours = reference_output(spec, x.movedim(1, -1), weight, bias).movedim(-1, 1)
        else:
            ours = reference_output(spec, x, weight, bias)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(ours.to(expected.dtype), expected, rtol=tol, atol=tol)


def _candidates(module: nn.Module) -> list[NormSpec]:
    """The forms ``module`` may compute, given its structure: last axis first, then channels first."""
    known = _KNOWN_NORMS.get(type(module))
    specs = [known(module)] if known is not None else [
        _structural_spec(module, centered, offset) for centered, offset in _CANDIDATE_FORMS
    ]
    last_axis = list(dict.fromkeys(spec for spec in specs if spec is not None))
    if known is not None:
        return last_axis  # torch's own norms normalise the last axes
    return last_axis + [replace(spec, channels_first=True) for spec in last_axis if len(spec.normalized_shape) == 1]


def detect_norm(module: nn.Module, values: Callable[[nn.Module], nn.Module] | None = None) -> NormSpec | None:
    """The :class:`NormSpec` that reproduces ``module``'s output, or ``None``.

    ``values`` gives the module to run for the numeric check (e.g. a materialised twin of a
    module on the meta device); default: ``module`` itself.
    """
    candidates = _candidates(module)
    if not candidates:
        return None  # not shaped like a norm: no values needed to say so
    probed = values(module) if values is not None else module
    return next((spec for spec in candidates if _matches(probed, spec)), None)


_OTHER_NORMALISATIONS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def why_not_a_norm(module: nn.Module) -> str | None:
    """For a module that looks like a normalisation but :func:`detect_norm` rejected: why, naming
    what ruled it out: its structure (what it holds) or its numerics (what it computes).

    ``None`` for modules that do not look like one (they are not reported).
    """
    name = type(module).__name__
    if isinstance(module, _OTHER_NORMALISATIONS):
        return f"{name} normalises over the batch, groups or channels; only LayerNorm/RMSNorm forms share memory"
    looks_like_norm = "Norm" in name or any(hasattr(module, a) for a in _EPS_ATTRIBUTES)
    if not looks_like_norm or next(module.children(), None) is not None:
        return None
    problem = None if type(module) in _KNOWN_NORMS else structure_problem(module)
    if problem is not None:
        return f"structure: {problem}"
    return (
        "numerics: its output matches none of the forms the memory-sharing norms compute (LayerNorm, RMSNorm, "
        "RMSNorm with 1 + weight; over the last axis, or over dim 1 of an N, C, H, W input)"
    )


def gamma(module: nn.Module, offset: float) -> Tensor | None:
    """The effective scale ``weight + offset`` of a norm (``None`` without weight)."""
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach() + offset


def build_converted_norm(
    original: nn.Module, spec: NormSpec, strategy: str, dtype_policy: str, min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT
) -> nn.Module:
    """The converted norm of ``spec``'s form that shares ``original``'s parameters (see
    :meth:`~lightning_approxbp.nn.norm.ConvertedNorm.from_module`)."""
    cls = ConvertedLayerNorm if spec.centered else ConvertedRMSNorm
    return cls.from_module(original, spec, strategy, dtype_policy, min_keep_weight)


@dataclass(frozen=True)
class NormConfig:
    """The norm rule's options (the same names as in
    :class:`~lightning_approxbp.conversion.config.ConversionConfig`, which documents them)."""

    norms: bool = True
    share_norm_output: bool = True
    affine: str = "auto"
    min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT

    def __post_init__(self) -> None:
        if self.affine not in AFFINE_STRATEGIES:
            raise OptionError("affine", self.affine, AFFINE_STRATEGIES)
        if self.affine != "auto" and not self.norms:
            raise ValueError(f"affine={self.affine!r} only applies to norms, but norms=False; drop affine or set norms=True.")
        if not self.min_keep_weight > 0:
            raise ValueError(f"min_keep_weight must be positive, got {self.min_keep_weight!r}.")


@dataclass
class Decision:
    """What happens to one norm (``strategy=None``: it is skipped)."""

    strategy: str | None
    dtype_policy: str = "input"
    # merge: the linear layers that take the affine; otherwise: those that share the output
    consumers: list[nn.Module] = field(default_factory=list)
    reason: str = ""


@dataclass
class NormPlan:
    """A norm candidate, where the probe saw its output go (``None``: not traced), and the decision."""

    candidate: Candidate
    uses: NormUses | None
    decision: Decision


def _features(spec: NormSpec) -> int | None:
    """The norm's feature count when it normalises the last axis only (what a linear layer
    reads, so its affine can move there); ``None`` for several axes or channels first."""
    return spec.normalized_shape[0] if len(spec.normalized_shape) == 1 and not spec.channels_first else None


def _min_abs_gamma(norm: nn.Module, offset: float) -> float | None:
    scale = gamma(norm, offset)
    return None if scale is None or scale.numel() == 0 or scale.is_meta else scale.abs().min().item()


def decide(norm: nn.Module, spec: NormSpec, uses: NormUses | None, config: NormConfig) -> Decision:
    """Choose the affine strategy and output dtype policy of one norm (see ConversionConfig.affine)."""
    traced = uses is not None and uses.called
    linear_only = traced and uses.all_linear
    dtype_policy = "autocast" if linear_only else "input"
    sharing = uses.consumers if traced and config.share_norm_output else []
    if not (spec.has_weight or spec.has_bias):
        return Decision("plain", dtype_policy, sharing, reason="no affine parameters: exact")
    blockers = "" if not traced else ", ".join(uses.blockers()[:4])
    if traced and uses.all_mergeable and _features(spec) is not None:
        merge_reason = f"affine applied in {len(uses.consumers)} consumer(s): exact"
        merge = Decision("merge", "autocast", uses.consumers, merge_reason)
    elif not traced:
        merge = Decision(None, reason="uses not traced (no probe batch)" if uses is None else "not called by the probe")
    else:
        merge = Decision(None, reason=f"output also used by {blockers}")
    if config.affine == "merge" or (config.affine == "auto" and merge.strategy):
        return merge
    smallest = _min_abs_gamma(norm, spec.offset)
    if smallest is not None and smallest < config.min_keep_weight:
        reason = f"min |weight| = {smallest:.1e} < min_keep_weight = {config.min_keep_weight:g}: output recovery unsafe"
        return Decision(None, reason=reason if config.affine == "keep" else f"{merge.reason}; {reason}")
    keep_reason = "affine kept (forced)" if config.affine == "keep" else f"{merge.reason}; affine kept"
    if smallest is not None:
        keep_reason += f", min |weight| = {smallest:.2g}"
    elif spec.has_weight and norm.weight.is_meta:
        keep_reason += ", min |weight| checked at the first forward with real weights"
    if dtype_policy == "input":
        keep_reason += "; emits its input dtype under autocast (output feeds more than linear layers)"
    return Decision("keep", dtype_policy, sharing, reason=keep_reason)


class NormRule(Rule):
    """LayerNorm/RMSNorm forms become memory-sharing norms; their consumer layers merge the
    affine or share the output (:class:`~lightning_approxbp.nn.shared_input.SharedInputLinear`, ...)."""

    name = "norm"
    config_type = NormConfig
    converted = (ConvertedNorm, *SHARED_INPUT_TYPES)

    def find(self, site: Site, state: ConversionState) -> bool:
        if not self.options(state).norms:
            return False
        module = site.module
        spec = state.recognise(self.name, module, detect_norm)
        if spec is not None:
            if not site.holders:
                state.report.add(site.fqn, type(module).__name__, "skipped", reason="the root cannot be replaced in place")
            else:
                state.add(self, Candidate(site, spec))
            return True
        reason = why_not_a_norm(module)
        if reason is not None:
            state.report.add(site.fqn, type(module).__name__, "skipped", reason=reason)
        return reason is not None

    def traced_norms(self, candidates: list[Candidate]) -> dict[nn.Module, int | None]:
        return {c.site.module: _features(c.spec) for c in candidates}

    def decide(self, candidate: Candidate, state: ConversionState) -> NormPlan:
        uses = state.reference.norm_uses[candidate.site.module] if state.reference is not None else None
        return NormPlan(candidate, uses, decide(candidate.site.module, candidate.spec, uses, self.options(state)))

    def apply(self, plan: NormPlan, state: ConversionState) -> None:
        site, spec, decision = plan.candidate.site, plan.candidate.spec, plan.decision
        config: NormConfig = self.options(state)
        kind = type(site.module).__name__
        if decision.strategy is None:
            state.report.add(site.fqn, kind, "skipped", reason=decision.reason)
            _report_readers(plan, config, state)
            return
        new = build_converted_norm(site.module, spec, decision.strategy, decision.dtype_policy, config.min_keep_weight)
        state.log.replace_site(site, new)
        layout = " channels-first" if spec.channels_first else ""
        strategy = f"{spec.kind}{layout} {decision.strategy}, output={decision.dtype_policy}"
        state.report.add(site.fqn, kind, "converted", strategy, decision.reason)
        for consumer in decision.consumers:
            consumer_site = state.site_of[id(consumer)]
            if decision.strategy == "merge":
                replacement, strategy = merge_into(consumer, new), f"applies affine of {site.fqn}"
            else:
                replacement, strategy = share_input_of(consumer), f"saves the output of {site.fqn}, no copy"
            state.log.replace_site(consumer_site, replacement)
            state.report.add(consumer_site.fqn, type(consumer).__name__, "converted", strategy)
        _report_readers(plan, config, state)


def _report_readers(plan: NormPlan, config: NormConfig, state: ConversionState) -> None:
    """A row for every layer that reads the norm's output but was left as it was, saying why."""
    uses, norm_fqn, decision = plan.uses, plan.candidate.site.fqn, plan.decision
    if uses is None:
        return
    changed = {state.site_of[id(consumer)].fqn for consumer in decision.consumers}
    if decision.strategy is None:
        why = f"reads the output of {norm_fqn}, which was skipped: keeps its own input copy"
    elif not config.share_norm_output and decision.strategy != "merge":
        why = f"reads the output of {norm_fqn}; share_norm_output=False: keeps its own input copy"
    else:
        why = f"reads the output of {norm_fqn} together with other inputs: keeps its own input copy"
    readers = [(fqn, why) for fqn in uses.layer_readers if fqn not in changed]
    readers += [
        (fqn, (f"reads the output of {norm_fqn} through {dropout} (a new tensor while training), which no "
               "other layer saves: keeps its own input copy"))
        for fqn, dropout in dict.fromkeys(uses.through_dropout)
    ]
    listed = {row.fqn for row in state.report.rows}
    for fqn, why in readers:
        if fqn and fqn not in listed:
            listed.add(fqn)
            state.report.add(fqn, type(state.root.get_submodule(fqn)).__name__, "skipped", reason=why)
