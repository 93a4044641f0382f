"""Triton kernels of the gated product ``h = act(g) * u`` (forward) and its exact backward.

Both are one elementwise pass over flat contiguous tensors: the forward reads ``g`` and ``u`` and
writes ``h``; the backward reads ``dh``, ``g`` and ``u`` and writes ``dg``, ``du`` and ``h`` (which
the down projection's weight gradient needs, recomputed instead of saved). Math in fp32, each
result rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_approxbp.activations import get_activation
from lightning_approxbp.ops.activation_triton import activation, activation_derivative
from lightning_approxbp.ops.kernel_launch import KernelLaunch

BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _gated_product_fwd_kernel(G_ptr, U_ptr, H_ptr, n_elements, ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    g = tl.load(G_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(H_ptr + offsets, (activation(g, ACTIVATION) * u).to(H_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_product_bwd_kernel(
    DH_ptr, G_ptr, U_ptr, DG_ptr, DU_ptr, H_ptr, n_elements, ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dh = tl.load(DH_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = activation(g, ACTIVATION)
    tl.store(DG_ptr + offsets, (dh * u * activation_derivative(g, ACTIVATION)).to(DG_ptr.dtype.element_ty), mask=mask)
    tl.store(DU_ptr + offsets, (dh * a).to(DU_ptr.dtype.element_ty), mask=mask)
    tl.store(H_ptr + offsets, (a * u).to(H_ptr.dtype.element_ty), mask=mask)


def plan_forward(g: Tensor, u: Tensor, activation_name: str) -> tuple[KernelLaunch, Tensor]:
    """The forward launch for contiguous, non-empty ``g`` and ``u`` of one dtype, and ``h``'s buffer."""
    h = torch.empty_like(g)
    launch = KernelLaunch(
        kernel=_gated_product_fwd_kernel,
        grid=(triton.cdiv(g.numel(), BLOCK_SIZE),),
        args={"G_ptr": g, "U_ptr": u, "H_ptr": h, "n_elements": g.numel()},
        constexprs={"ACTIVATION": get_activation(activation_name).kernel_id, "BLOCK_SIZE": BLOCK_SIZE},
        num_warps=NUM_WARPS,
    )
    return launch, h


def plan_backward(
    grad_h: Tensor, g: Tensor, u: Tensor, activation_name: str
) -> tuple[KernelLaunch, Tensor, Tensor, Tensor]:
    """The backward launch and its (grad_g, grad_u, h) buffers."""
    grad_g, grad_u, h = torch.empty_like(g), torch.empty_like(u), torch.empty_like(g)
    launch = KernelLaunch(
        kernel=_gated_product_bwd_kernel,
        grid=(triton.cdiv(g.numel(), BLOCK_SIZE),),
        args={"DH_ptr": grad_h, "G_ptr": g, "U_ptr": u, "DG_ptr": grad_g, "DU_ptr": grad_u, "H_ptr": h, "n_elements": g.numel()},
        constexprs={"ACTIVATION": get_activation(activation_name).kernel_id, "BLOCK_SIZE": BLOCK_SIZE},
        num_warps=NUM_WARPS,
    )
    return launch, grad_g, grad_u, h


def forward(g: Tensor, u: Tensor, activation_name: str) -> Tensor:
    launch, h = plan_forward(g, u, activation_name)
    launch.run()
    return h


def backward(grad_h: Tensor, g: Tensor, u: Tensor, activation_name: str) -> tuple[Tensor, Tensor, Tensor]:
    launch, grad_g, grad_u, h = plan_backward(grad_h, g, u, activation_name)
    launch.run()
    return grad_g, grad_u, h
