"""Memory-sharing norm modules: they save their output for backward, not their input.

Parameter names match :class:`torch.nn.LayerNorm` and the usual RMSNorm modules (``weight``,
``bias``), so state dicts load into either. :class:`ConvertedLayerNorm` and
:class:`ConvertedRMSNorm` are what a conversion puts in place of a norm
(:meth:`ConvertedNorm.from_module`): they keep the original ``weight``/``bias`` Parameter
objects under the same names, so state dicts, optimiser state and checkpoints are unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from lightning_approxbp._warnings import warn_rank_zero
from lightning_approxbp.functional import _as_shape, ms_layer_norm, ms_rms_norm
from lightning_approxbp.ops.ms_norm import DEFAULT_WEIGHT_CLAMP, resolve_output_dtype

STRATEGIES: tuple[str, ...] = ("merge", "keep", "plain")
DTYPE_POLICIES: tuple[str, ...] = ("autocast", "input")
DEFAULT_MIN_KEEP_WEIGHT = 1e-2


class _MSNormBase(nn.Module):
    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float,
        elementwise_affine: bool,
        bias: bool,
        output_dtype: torch.dtype | None,
        weight_clamp: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.output_dtype = output_dtype
        self.weight_clamp = weight_clamp
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.output_dtype is not None:
            text += f", output_dtype={self.output_dtype}"
        return text


class MSLayerNorm(_MSNormBase):
    """LayerNorm that shares its saved activation with the layer it feeds.

    Without affine parameters (``elementwise_affine=False``) the backward is exact. With them,
    the normalised value is recovered from the output in backward (``(y - bias) / weight``,
    ``weight`` clamped away from zero): exact in real arithmetic, less precise where
    ``|weight|`` is small. The conversion engine prefers merging the affine into the next
    linear layers, which keeps the exact form.

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as :class:`torch.nn.LayerNorm`.
        output_dtype: the dtype emitted. Default: the autocast dtype under autocast, else the
            input dtype. Pass ``torch.float32`` where the output also feeds an fp32 residual stream.
        weight_clamp: smallest ``|weight|`` divided by when recovering the normalised value.

    Example::

        >>> import torch
        >>> norm = MSLayerNorm(16, elementwise_affine=False)
        >>> norm(torch.randn(2, 16, requires_grad=True)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        output_dtype: torch.dtype | None = None,
        weight_clamp: float = DEFAULT_WEIGHT_CLAMP,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, output_dtype, weight_clamp, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return ms_layer_norm(
            x,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            output_dtype=self.output_dtype,
            weight_clamp=self.weight_clamp,
        )


class MSRMSNorm(_MSNormBase):
    """RMSNorm that shares its saved activation with the layer it feeds.

    Args:
        normalized_shape: size of the normalised trailing dimension(s).
        eps: added to the mean square.
        elementwise_affine: whether the module has a ``weight``.
        offset: constant added to ``weight`` in the forward, e.g. ``1.0`` for Gemma's ``(1 + w)``
            (then ``weight`` is initialised to zeros).
        output_dtype, weight_clamp, device, dtype: as :class:`MSLayerNorm`.

    Example::

        >>> import torch
        >>> MSRMSNorm(8, offset=1.0)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        *,
        offset: float = 0.0,
        output_dtype: torch.dtype | None = None,
        weight_clamp: float = DEFAULT_WEIGHT_CLAMP,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, output_dtype, weight_clamp, device, dtype)
        self.offset = offset
        if self.weight is not None and offset:
            with torch.no_grad():
                self.weight.fill_(1.0 - offset)

    def forward(self, x: Tensor) -> Tensor:
        return ms_rms_norm(
            x,
            self.normalized_shape,
            self.weight,
            self.eps,
            offset=self.offset,
            output_dtype=self.output_dtype,
            weight_clamp=self.weight_clamp,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + f", offset={self.offset}" if self.offset else text


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


def resolve_eps(eps: float | None, x: Tensor) -> float:
    """``eps``, or the machine epsilon of ``x``'s dtype for ``None`` (as ``torch.nn.RMSNorm``)."""
    return torch.finfo(x.dtype).eps if eps is None else eps


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

    def __init__(
        self,
        *args: Any,
        strategy: str,
        dtype_policy: str,
        min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT,
        channels_first: bool = False,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the norm class after this mixin; ``min_keep_weight``: under
        ``"keep"``, the smallest ``|weight + offset|`` accepted at run time before the norm falls
        back to saving its input (exact)."""
        if strategy not in STRATEGIES or dtype_policy not in DTYPE_POLICIES:
            raise ValueError(f"Unknown strategy {strategy!r} or output dtype policy {dtype_policy!r}.")
        super().__init__(*args, **kwargs)
        self.strategy = strategy
        self.dtype_policy = dtype_policy
        self.min_keep_weight = min_keep_weight
        self.channels_first = channels_first

    @classmethod
    def from_module(
        cls,
        original: nn.Module,
        spec: NormSpec,
        strategy: str,
        dtype_policy: str,
        min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT,
    ) -> nn.Module:
        """The converted norm computing ``spec``, holding ``original``'s parameters (same names,
        same objects) and train mode."""
        # The parameters __init__ makes are placeholders (the original's replace them): on meta
        # they cost nothing, whatever the size and device of the model.
        with torch.device("meta"):
            new = cls(
                spec.normalized_shape, spec.eps, spec.has_weight, **cls._form_arguments(spec),
                strategy=strategy, dtype_policy=dtype_policy, min_keep_weight=min_keep_weight,
                channels_first=spec.channels_first,
            )
        if spec.has_weight:
            new.weight = original.weight
        if spec.has_bias:
            new.bias = original.bias
        new.train(original.training)
        if strategy == "keep" and spec.has_weight:
            _watch_kept_affine(new)
        return new

    @staticmethod
    def _form_arguments(spec: NormSpec) -> dict[str, Any]:
        """The constructor arguments of the norm class that are particular to its form."""
        raise NotImplementedError

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
        # Also covers copies (deepcopy, unpickling), which from_module never saw.
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

    @staticmethod
    def _form_arguments(spec: NormSpec) -> dict[str, Any]:
        return {"bias": spec.has_bias}

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

    @staticmethod
    def _form_arguments(spec: NormSpec) -> dict[str, Any]:
        return {"offset": spec.offset}

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


