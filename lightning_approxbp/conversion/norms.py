"""Recognise LayerNorm / RMSNorm modules and build their memory-sharing replacements.

``nn.LayerNorm`` and ``nn.RMSNorm`` are read directly. Other norms (the RMSNorm classes of
Llama, Mistral, Qwen2, T5, Gemma's ``(1 + w)`` form, custom LayerNorms) are recognised by
structure: a 1-D ``weight`` (and optional ``bias``) as their whole state, and an ``eps`` or
``variance_epsilon`` attribute; an affine-free one by its ``eps`` and ``normalized_shape``
attributes. Each candidate form (RMS, RMS with ``1 + w``, centred) is then checked numerically
against the module's own output, over the last axis and then over dim 1 of an ``N, C, H, W``
input (channels first, as ConvNeXt's LayerNorm with ``data_format="channels_first"``); a module
that matches none is left alone, and :func:`why_not_a_norm` says whether its structure or its
numerics ruled it out.

The replacements keep the original ``weight``/``bias`` Parameter objects under the same names,
so state dicts, optimiser state and checkpoints are unchanged.

Example::

    >>> from torch import nn
    >>> spec = detect_norm(nn.LayerNorm(8))
    >>> spec.centered, spec.normalized_shape
    (True, (8,))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from lightning_approxbp._warnings import warn_rank_zero
from lightning_approxbp.conversion.config import DEFAULT_MIN_KEEP_WEIGHT
from lightning_approxbp.functional import ms_layer_norm, ms_rms_norm
from lightning_approxbp.nn import MSLayerNorm, MSRMSNorm
from lightning_approxbp.ops.ms_norm import DEFAULT_WEIGHT_CLAMP, resolve_output_dtype

STRATEGIES: tuple[str, ...] = ("merge", "keep", "plain")
DTYPE_POLICIES: tuple[str, ...] = ("autocast", "input")
_EPS_ATTRIBUTES: tuple[str, ...] = ("eps", "variance_epsilon")
_CANDIDATE_FORMS: tuple[tuple[bool, float], ...] = ((False, 0.0), (False, 1.0), (True, 0.0))


@dataclass(frozen=True)
class NormSpec:
    """What a norm computes: ``(x - mean if centered) * rstd * (weight + offset) + bias``.

    ``eps=None`` is ``torch.nn.RMSNorm``'s default: the machine epsilon of the input's dtype.
    ``channels_first``: the norm normalises dim 1 (``normalized_shape`` is ``(channels,)``).
    """

    normalized_shape: tuple[int, ...]
    eps: float | None
    centered: bool
    offset: float
    has_weight: bool
    has_bias: bool
    channels_first: bool = False

    @property
    def kind(self) -> str:
        return "layer_norm" if self.centered else "rms_norm"


def _spec_layer_norm(module: nn.Module) -> NormSpec | None:
    return NormSpec(
        tuple(module.normalized_shape), module.eps, True, 0.0, module.weight is not None, module.bias is not None
    )


def _spec_rms_norm(module: nn.Module) -> NormSpec | None:
    eps = None if module.eps is None else float(module.eps)
    return NormSpec(tuple(module.normalized_shape), eps, False, 0.0, module.weight is not None, False)


def resolve_eps(eps: float | None, x: Tensor) -> float:
    """``eps``, or the machine epsilon of ``x``'s dtype for ``None`` (as ``torch.nn.RMSNorm``)."""
    return torch.finfo(x.dtype).eps if eps is None else eps


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


# The converted norms that keep their affine, re-checked after every optimizer step (see
# ConvertedNorm._keeps_unsafe_affine). Weak: a norm that is garbage collected drops out.
_KEPT_AFFINE_NORMS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_step_hook: RemovableHandle | None = None


def _check_kept_affines(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for norm in list(_KEPT_AFFINE_NORMS):
        norm._keeps_unsafe_affine()


def _watch_kept_affine(norm: nn.Module) -> None:
    """Re-check ``norm``'s weight after every optimizer step (one hook shared by all norms)."""
    global _step_hook
    _KEPT_AFFINE_NORMS.add(norm)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_check_kept_affines)


class ConvertedNorm:
    """Mixin: the strategy-dependent forward shared by both converted norm classes.

    ``strategy``: ``"merge"`` (the affine is applied by the consumers: this module normalises
    only, exact backward), ``"keep"`` (affine applied here, recovered from the output in
    backward) or ``"plain"`` (no affine parameters). ``dtype_policy``: ``"autocast"`` emits the
    autocast dtype under autocast (every consumer is a linear layer that would cast anyway, so
    norm and consumer save one tensor), ``"input"`` emits the input dtype as the original norm did.
    """

    strategy: str
    dtype_policy: str
    min_keep_weight: float
    # Set once a kept affine's weight was found unsafe: from then on this norm saves its input
    # like a stock norm (exact), instead of recovering x_hat from its output.
    exact_fallback: bool = False
    channels_first: bool = False
    _checked_weight: tuple[int, int] | None = None

    def _keeps_unsafe_affine(self) -> bool:
        """Whether the kept affine's ``|weight + offset|`` fell below ``min_keep_weight``.

        Checked when the weight changes (its version counter moves at every optimizer step):
        one scalar read per kept-affine norm per step; merged and plain norms never check.
        Under ``torch.compile`` the forward reads the flag only (a scalar read there would break
        the graph): the check runs eagerly after every optimizer step instead, through a step
        hook, so the flag is current before the next forward reads it (a flag that turns on makes
        the compiled forward recompile).
        """
        if self.strategy != "keep" or self.exact_fallback or self.weight is None:  # type: ignore[attr-defined]
            return self.exact_fallback
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        if torch.compiler.is_compiling() or weight.is_meta or torch._guards.detect_fake_mode() is not None:
            return False  # no values to read now: checked at the first forward that has them
        # Also covers copies (deepcopy, unpickling), which build_converted_norm never saw.
        _watch_kept_affine(self)  # type: ignore[arg-type]
        version = (weight.data_ptr(), weight._version)
        if version != self._checked_weight:
            self._checked_weight = version
            smallest = (weight.detach().float() + getattr(self, "offset", 0.0)).abs().min().item()
            if smallest < self.min_keep_weight:
                self.exact_fallback = True
                warn_rank_zero(
                    f"ApproxBP: a norm that keeps its affine ({type(self).__name__}, {self.normalized_shape}) now has "  # type: ignore[attr-defined]
                    f"min |weight| = {smallest:.1e} < min_keep_weight = {self.min_keep_weight:g}; recovering its input "
                    "from its output would lose precision, so it now saves its input like a stock norm (exact, "
                    "no memory saving for this norm)."
                )
        return self.exact_fallback

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_first:
            # The ops normalise the last axis: move the channels there and back (views, as
            # ConvNeXt's own LayerNorm does). The op saves its channels-last output, and what this
            # returns is a view of it, so the next layer saves the same storage.
            return self._normalise(x.movedim(1, -1)).movedim(-1, 1)  # type: ignore[attr-defined]
        return self._normalise(x)  # type: ignore[attr-defined]

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        return y.to(resolve_output_dtype(x, self._output_dtype(x)))

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        if self.strategy == "merge":
            return None, None
        return self.weight, getattr(self, "bias", None)  # type: ignore[attr-defined]

    def _output_dtype(self, x: Tensor) -> torch.dtype | None:
        return None if self.dtype_policy == "autocast" else x.dtype

    def extra_repr(self) -> str:
        # Cooperative: the norm class after this mixin in the MRO supplies the shape and eps.
        text = f"{super().extra_repr()}, approxbp: affine={self.strategy}, output={self.dtype_policy}"  # type: ignore[misc]
        text += ", channels first" if self.channels_first else ""
        return text + (", exact fallback (unsafe weight)" if self.exact_fallback else "")


class ConvertedLayerNorm(ConvertedNorm, MSLayerNorm):
    """The :class:`~lightning_approxbp.nn.MSLayerNorm` that a conversion puts in place of a LayerNorm."""

    def _normalise(self, x: Tensor) -> Tensor:
        if self._keeps_unsafe_affine():
            return self._output(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps), x)
        weight, bias = self._affine()
        return ms_layer_norm(
            x, self.normalized_shape, weight, bias, self.eps,
            output_dtype=self._output_dtype(x), weight_clamp=self.weight_clamp,
        )


class ConvertedRMSNorm(ConvertedNorm, MSRMSNorm):
    """The :class:`~lightning_approxbp.nn.MSRMSNorm` that a conversion puts in place of an RMSNorm."""

    def _normalise(self, x: Tensor) -> Tensor:
        if self._keeps_unsafe_affine():
            wide = x.float()
            axes = tuple(range(-len(self.normalized_shape), 0))
            y = wide * torch.rsqrt(wide.pow(2).mean(dim=axes, keepdim=True) + resolve_eps(self.eps, x))
            return self._output(y * (self.weight.float() + self.offset), x)
        weight, _ = self._affine()
        return ms_rms_norm(
            x, self.normalized_shape, weight, resolve_eps(self.eps, x),
            offset=self.offset, output_dtype=self._output_dtype(x), weight_clamp=self.weight_clamp,
        )


def build_converted_norm(
    original: nn.Module, spec: NormSpec, strategy: str, dtype_policy: str, min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT
) -> nn.Module:
    """A converted norm that shares ``original``'s parameters (same names, same objects).

    ``min_keep_weight``: under ``"keep"``, the smallest ``|weight + offset|`` the norm accepts
    at run time before it falls back to saving its input (exact).
    """
    if strategy not in STRATEGIES or dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"Unknown strategy {strategy!r} or output dtype policy {dtype_policy!r}.")
    cls = ConvertedLayerNorm if spec.centered else ConvertedRMSNorm
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.normalized_shape = spec.normalized_shape
    new.eps = spec.eps
    new.elementwise_affine = spec.has_weight
    new.output_dtype = None
    new.weight_clamp = DEFAULT_WEIGHT_CLAMP
    new.offset = spec.offset
    new.strategy = strategy
    new.dtype_policy = dtype_policy
    new.min_keep_weight = min_keep_weight
    new.channels_first = spec.channels_first
    new.weight = original.weight if spec.has_weight else None
    if spec.centered:
        new.bias = original.bias if spec.has_bias else None
    new.train(original.training)
    if strategy == "keep" and spec.has_weight:
        _watch_kept_affine(new)
    return new
