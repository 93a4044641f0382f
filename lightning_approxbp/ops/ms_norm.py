"""Memory-sharing LayerNorm / RMSNorm (MS-BP): backward from the output, not the input.

A stock norm saves its input for backward while the layer it feeds saves the norm's output:
two copies of one activation. These ops save the output ``y`` (the tensor the consumer keeps
anyway) and one ``rstd`` per row, and compute the input gradient from them:

- LayerNorm: ``dx = rstd * (dy_hat - mean(dy_hat) - x_hat * mean(dy_hat * x_hat))``
- RMSNorm:   ``dx = rstd * (dy_hat - x_hat * mean(dy_hat * x_hat))``

with ``x_hat`` the normalised value and ``dy_hat = dy * gamma``. Without affine parameters
``x_hat = y`` and the formula is exact. With them, ``x_hat = (y - beta) / gamma`` is recovered
from the output, ``gamma`` clamped away from zero with its sign kept; that recovery loses
precision where ``|gamma|`` is small or ``beta`` dominates ``y`` (see docs/ops.md).

Statistics and the affine transform are computed in fp32 (fp64 for fp64 inputs) and the
output is rounded once to the requested dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import (
    autocast_dtype,
    call_op,
    check_floating,
    compute_dtype,
    guard_double_backward,
    offset_weight,
    requires_grad,
)
from lightning_approxbp.ops.dispatch import dispatch

OP_NAME = "ms_norm"
_TRITON_KERNELS = "lightning_approxbp.ops.ms_norm_triton"
_NATIVE_KERNELS = "lightning_approxbp.ops.ms_norm_native"
DEFAULT_WEIGHT_CLAMP = 1e-4


def clamp_away_from_zero(weight: Tensor, minimum: float) -> Tensor:
    """``sign(w) * max(|w|, minimum)`` with ``sign(0) = +1``: a divisor that is never zero."""
    return torch.where(weight >= 0, weight.clamp(min=minimum), weight.clamp(max=-minimum))


def _empty_like_optional(reference: Tensor | None, device: torch.device) -> Tensor:
    # torch.library ops return tensors, not None: an empty tensor stands for "no gradient".
    return torch.empty(0, device=device) if reference is None else torch.empty_like(reference)


# ----------------------------------------------------------------------------- PyTorch path
#
# The PyTorch path leans on torch's fused norm kernels, fed with compute-dtype tensors. The
# LayerNorm backward trick: a norm's backward evaluated at the input ``x_hat`` with ``mean = 0`` and
# ``rstd = 1`` is exactly the output formula without its final ``rstd`` factor, because
# normalising ``x_hat`` with those statistics returns ``x_hat`` itself.

# Fused RMSNorm forward exists on every device from torch 2.7; its backward is CUDA-only.
_HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


def _torch_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, centered: bool, offset: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    gamma = None if weight is None else offset_weight(weight, dtype, offset)
    beta = None if bias is None else bias.to(dtype)
    n_cols = (x.shape[-1],)
    if centered:
        y, _, rstd = torch.native_layer_norm(xf, n_cols, gamma, beta, eps)
    elif _HAS_FUSED_RMS_NORM:
        y, rstd = torch.ops.aten._fused_rms_norm(xf, list(n_cols), gamma, eps)
    else:
        rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
        y = xf * rstd if gamma is None else xf * rstd * gamma
    return y.to(out_dtype), rstd.reshape(-1)


def _torch_backward(
    grad_output: Tensor,
    y: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    centered: bool,
    offset: float,
    weight_clamp: float,
    input_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    # Every op below computes in the compute dtype: a 16-bit ``y`` meets an fp32 operand and is
    # widened on the fly (exactly), so no widened copy of it is made; ops on tensors made here
    # run in place.
    dtype = rstd.dtype
    gamma = None if weight is None else offset_weight(weight, dtype, offset)
    beta = None if bias is None else bias.to(dtype)
    divisor = None if gamma is None else clamp_away_from_zero(gamma, weight_clamp)
    if beta is not None and divisor is not None:
        # ``y / divisor - beta / divisor`` in one pass over ``y``.
        x_hat = torch.addcdiv(beta.div(divisor).neg_(), y, divisor)
    elif beta is not None:
        x_hat = torch.sub(y, beta)
    elif divisor is not None:
        x_hat = torch.div(y, divisor)
    else:
        x_hat = y
    dy = grad_output.to(dtype)
    mask = [True, gamma is not None, beta is not None]
    if centered:
        n_cols = (y.shape[-1],)
        unit = torch.ones(y.shape[0], 1, dtype=dtype, device=y.device)
        dx, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
            dy, x_hat.to(dtype), n_cols, torch.zeros_like(unit), unit, gamma, beta, mask
        )
    else:
        dy_hat = dy if gamma is None else dy * gamma
        projection = torch.mul(dy_hat, x_hat).mean(dim=-1, keepdim=True)
        dx = torch.mul(x_hat, projection)
        dx = torch.sub(dy_hat, dx, out=dx)
        dgamma = None if gamma is None else torch.mul(dy, x_hat).sum(dim=0)
        dbeta = None
    grad_weight = _empty_like_optional(weight, y.device) if dgamma is None else dgamma.to(weight.dtype)
    grad_bias = _empty_like_optional(bias, y.device) if dbeta is None else dbeta.to(bias.dtype)
    # dx is ours: scale it in place, or round it once into the input's dtype.
    out = dx if input_dtype == dx.dtype else torch.empty_like(dx, dtype=input_dtype)
    return torch.mul(dx, rstd.unsqueeze(-1), out=out), grad_weight, grad_bias


# ----------------------------------------------------------------------------- torch.library


def _ms_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    centered: bool,
    offset: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Normalise the rows of a 2-D ``x``; returns (output in ``out_dtype``, rstd per row)."""
    x = x.contiguous()
    if x.numel() == 0:
        rstd = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
        return torch.empty(x.shape, dtype=out_dtype, device=x.device), rstd
    run = dispatch(OP_NAME, x, _torch_forward, f"{_TRITON_KERNELS}:forward")
    return run(x, weight, bias, eps, centered, offset, out_dtype)


ms_norm_forward = torch.library.custom_op("approxbp::ms_norm_forward", mutates_args=())(_ms_norm_forward)


@ms_norm_forward.register_fake
def _(x, weight, bias, eps, centered, offset, out_dtype):
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return y, x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


def _ms_norm_backward(
    grad_output: Tensor,
    y: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    centered: bool,
    offset: float,
    weight_clamp: float,
    input_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); absent parameters get empty tensors."""
    grad_output = grad_output.contiguous()
    if grad_output.numel() == 0:
        grad_weight = torch.zeros_like(weight) if weight is not None else torch.empty(0, device=y.device)
        grad_bias = torch.zeros_like(bias) if bias is not None else torch.empty(0, device=y.device)
        return torch.empty(y.shape, dtype=input_dtype, device=y.device), grad_weight, grad_bias
    run = dispatch(OP_NAME, grad_output, _torch_backward, f"{_TRITON_KERNELS}:backward", f"{_NATIVE_KERNELS}:backward")
    return run(grad_output, y, rstd, weight, bias, centered, offset, weight_clamp, input_dtype)


ms_norm_backward = torch.library.custom_op("approxbp::ms_norm_backward", mutates_args=())(_ms_norm_backward)


@ms_norm_backward.register_fake
def _(grad_output, y, rstd, weight, bias, centered, offset, weight_clamp, input_dtype):
    grad_input = torch.empty(y.shape, dtype=input_dtype, device=y.device)
    return grad_input, _empty_like_optional(weight, y.device), _empty_like_optional(bias, y.device)


# ----------------------------------------------------------------------------- autograd


class MSNormFunction(torch.autograd.Function):
    """LayerNorm/RMSNorm over the rows of a 2-D input that backpropagates from its output.

    Saves for backward: the output (shared with the consumer that saves it too) and one
    fp32 ``rstd`` per row, plus the affine parameters when present. Recomputes the normalised
    value from the output in backward.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        centered: bool,
        offset: float,
        out_dtype: torch.dtype,
        weight_clamp: float,
    ) -> Tensor:
        y, rstd = call_op(ms_norm_forward, _ms_norm_forward, x, weight, bias, eps, centered, offset, out_dtype)
        ctx.save_for_backward(y, rstd, weight, bias)
        ctx.centered, ctx.offset, ctx.weight_clamp, ctx.input_dtype = centered, offset, weight_clamp, x.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        y, rstd, weight, bias = ctx.saved_tensors
        with torch.no_grad():
            grad_input, grad_weight, grad_bias = call_op(
                ms_norm_backward, _ms_norm_backward,
                grad_output, y, rstd, weight, bias, ctx.centered, ctx.offset, ctx.weight_clamp, ctx.input_dtype,
            )
        grad_weight = grad_weight if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias if bias is not None and ctx.needs_input_grad[2] else None
        grads = guard_double_backward((grad_input, grad_weight, grad_bias), grad_output, OP_NAME)
        return (*grads, None, None, None, None, None)


def resolve_output_dtype(x: Tensor, output_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the norm emits: explicit, else the autocast dtype when autocast is on, else x's.

    Emitting the autocast dtype makes the consumer's cast a no-op, so the consumer saves the
    very tensor the norm saved: one copy instead of two.
    """
    if output_dtype is not None:
        return output_dtype
    return autocast_dtype(x) or x.dtype


def ms_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float,
    centered: bool,
    offset: float = 0.0,
    output_dtype: torch.dtype | None = None,
    weight_clamp: float = DEFAULT_WEIGHT_CLAMP,
) -> Tensor:
    """Normalise ``x`` over its trailing ``normalized_shape`` (see the module docstring)."""
    check_floating(x, OP_NAME)
    normalized_shape = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(normalized_shape) :]) != normalized_shape or x.dim() < len(normalized_shape):
        raise ValueError(
            f"{OP_NAME}: input of shape {tuple(x.shape)} does not end in normalized_shape {normalized_shape}."
        )
    n_cols = 1
    for size in normalized_shape:
        n_cols *= size
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_floating(param, OP_NAME, name)
            if param.numel() != n_cols:
                raise ValueError(f"{OP_NAME}: {name} has {param.numel()} elements, expected {n_cols}.")
    out_dtype = resolve_output_dtype(x, output_dtype)
    rows = x.reshape(-1, n_cols)
    flat_weight = None if weight is None else weight.reshape(-1)
    flat_bias = None if bias is None else bias.reshape(-1)
    if not requires_grad(x, weight, bias):
        y, _ = call_op(ms_norm_forward, _ms_norm_forward, rows, flat_weight, flat_bias, eps, centered, offset, out_dtype)
    else:
        y = MSNormFunction.apply(rows, flat_weight, flat_bias, eps, centered, offset, out_dtype, weight_clamp)
    return y.view(x.shape)
