"""The down projection of a gated MLP, ``down(act(g) * u)``, saving only ``g`` and ``u``.

In a gated MLP (LLaMA, Mistral, Qwen2, Gemma: SwiGLU/GeGLU), eager PyTorch keeps ``g`` (for the
activation's backward), ``act(g)`` and ``u`` (for the product's backward) and the product ``h``
(for the down projection's weight gradient): four intermediate-size tensors per token. This op
keeps two, ``g`` and ``u``, and recomputes ``act(g)`` and ``h`` in backward (one elementwise pass
in the Triton kernel). Gradients are exact (the activation's true derivative, not a step function). The PyTorch
path runs eager's own elementwise ops, so its output and gradients equal eager's bit for bit; the
Triton kernels compute in fp32 and round ``h`` once instead of twice.

Saved for backward: ``g`` and ``u`` (in the compute dtype: under autocast the gate and up
projections already emit it, so these are their outputs, not copies) and the down projection's
parameters by reference.

Under autocast the matmul runs in the autocast dtype, as ``nn.Linear`` would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.activations import get_activation
from lightning_approxbp.ops._utils import (
    autocast_dtype,
    autocast_off,
    call_op,
    check_floating,
    compute_dtype,
    guard_double_backward,
)
from lightning_approxbp.ops.dispatch import dispatch

OP_NAME = "gated_mlp"
_TRITON_KERNELS = "lightning_approxbp.ops.gated_mlp_triton"


# ----------------------------------------------------------------------------- PyTorch path


# The PyTorch path runs eager's own ops in the input's dtype: ``act(g) * u`` and, in backward,
# the products and the activation's fused backward kernel that autograd runs for that expression.
# For 16-bit inputs each op computes in fp32 internally and rounds its result once, so ``act(g)``
# and ``h`` are rounded as eager rounds them and the output and gradients are eager's bit for bit;
# no tensor is widened in memory (fp32 temporaries of the intermediate size, several per pass,
# made the fused MLP 7-10% slower than eager on CPU).


def _torch_forward(g: Tensor, u: Tensor, activation: str) -> Tensor:
    # act(g) is a fresh tensor: the product goes into it, one intermediate-size buffer per call.
    return get_activation(activation).torch_forward(g).mul_(u)


def _torch_backward(grad_h: Tensor, g: Tensor, u: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    entry = get_activation(activation)
    if entry.torch_backward is not None:
        grad_g = entry.torch_backward(grad_h * u, g)
    else:
        # No fused backward kernel in torch (QuickGELU): the exact derivative, computed in fp32 and
        # rounded once.
        work = compute_dtype(g.dtype)
        grad_g = (grad_h.to(work) * u.to(work) * entry.derivative(g.to(work))).to(g.dtype)
    a = entry.torch_forward(g)
    grad_u = grad_h * a
    # act(g) is read no more: the recomputed product goes into it (the forward's op, in place).
    return grad_g, grad_u, a.mul_(u)


# ----------------------------------------------------------------------------- torch.library


def _gated_product_forward(g: Tensor, u: Tensor, activation: str) -> Tensor:
    """``act(g) * u`` in the dtype of ``g`` (``g`` and ``u`` of one shape and dtype)."""
    g, u = g.contiguous(), u.contiguous()
    if g.numel() == 0:
        return torch.empty_like(g)
    return dispatch(OP_NAME, g, _torch_forward, f"{_TRITON_KERNELS}:forward")(g, u, activation)


gated_product_forward = torch.library.custom_op("approxbp::gated_product_forward", mutates_args=())(_gated_product_forward)


@gated_product_forward.register_fake
def _(g: Tensor, u: Tensor, activation: str) -> Tensor:
    return torch.empty_like(g)


def _gated_product_backward(grad_h: Tensor, g: Tensor, u: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_g, grad_u, h)``: the exact gradients and the recomputed product."""
    grad_h, g, u = grad_h.contiguous(), g.contiguous(), u.contiguous()
    if g.numel() == 0:
        return torch.empty_like(g), torch.empty_like(u), torch.empty_like(g)
    return dispatch(OP_NAME, g, _torch_backward, f"{_TRITON_KERNELS}:backward")(grad_h, g, u, activation)


gated_product_backward = torch.library.custom_op("approxbp::gated_product_backward", mutates_args=())(_gated_product_backward)


@gated_product_backward.register_fake
def _(grad_h: Tensor, g: Tensor, u: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(g), torch.empty_like(u), torch.empty_like(g)


# ----------------------------------------------------------------------------- autograd


class GatedDownProjection(torch.autograd.Function):
    """``linear(act(g) * u, weight, bias)`` that saves ``g``, ``u`` and the parameters only.

    Recomputes ``act(g)``, ``act'(g)`` and the product in backward (one elementwise pass).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, g: Tensor, u: Tensor, weight: Tensor, bias: Tensor | None, activation: str, dtype: torch.dtype
    ) -> Tensor:
        g_c, u_c = g.to(dtype), u.to(dtype)
        h = call_op(gated_product_forward, _gated_product_forward, g_c, u_c, activation)
        rows = h.reshape(-1, h.shape[-1])
        with autocast_off(g):
            w = weight.to(dtype).t()
            out = rows @ w if bias is None else torch.addmm(bias.to(dtype), rows, w)
        ctx.save_for_backward(g_c, u_c, weight, bias)
        ctx.activation, ctx.g_dtype, ctx.u_dtype = activation, g.dtype, u.dtype
        return out.view(*h.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        g_c, u_c, weight, bias = ctx.saved_tensors
        needs_g, needs_u, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1]).to(g_c.dtype)
        grad_g = grad_u = grad_weight = grad_bias = None
        with torch.no_grad():
            grad_h = (grad_rows @ weight.to(g_c.dtype)).view(g_c.shape)
            dg, du, h = call_op(gated_product_backward, _gated_product_backward, grad_h, g_c, u_c, ctx.activation)
            if needs_weight:
                # The operand order autograd uses for nn.Linear's weight gradient.
                grad_weight = (grad_rows.t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
            if needs_bias and bias is not None:
                grad_bias = grad_rows.sum(dim=0).to(bias.dtype)
            grad_g = dg.to(ctx.g_dtype) if needs_g else None
            grad_u = du.to(ctx.u_dtype) if needs_u else None
        grads = guard_double_backward((grad_g, grad_u, grad_weight, grad_bias), grad_output, OP_NAME)
        return (*grads, None, None)


def gated_down_projection(
    g: Tensor, u: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str = "silu"
) -> Tensor:
    """``F.linear(act(g) * u, weight, bias)``, saving only ``g`` and ``u`` for backward (exact gradients).

    Args:
        g: the gate projection's output.
        u: the up projection's output (same shape).
        weight, bias: the down projection's parameters (``out x intermediate``).
        activation: a registry name (``"silu"`` for SwiGLU, ``"gelu"``/``"gelu_tanh"`` for GeGLU).

    Example::

        >>> import torch
        >>> g, u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        >>> w = torch.randn(4, 8)
        >>> out = gated_down_projection(g, u, w, activation="silu")
        >>> torch.allclose(out, torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w), atol=1e-5)
        True
    """
    get_activation(activation)
    for name, tensor in (("g", g), ("u", u), ("weight", weight)):
        check_floating(tensor, OP_NAME, name)
    if g.shape != u.shape:
        raise ValueError(f"{OP_NAME}: g and u must have one shape, got {tuple(g.shape)} and {tuple(u.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != g.shape[-1]:
        raise ValueError(
            f"{OP_NAME}: weight must be (out, {g.shape[-1]}) to take the product of shape {tuple(g.shape)}, "
            f"got {tuple(weight.shape)}."
        )
    dtype = autocast_dtype(g) or g.dtype
    return GatedDownProjection.apply(g, u, weight, bias, activation, dtype)
