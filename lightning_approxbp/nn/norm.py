"""Memory-sharing norm modules: they save their output for backward, not their input.

Parameter names match :class:`torch.nn.LayerNorm` and the usual RMSNorm modules (``weight``,
``bias``), so state dicts load into either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_approxbp.functional import _as_shape, ms_layer_norm, ms_rms_norm
from lightning_approxbp.ops.ms_norm import DEFAULT_WEIGHT_CLAMP


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
