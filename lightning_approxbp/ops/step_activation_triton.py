"""Triton kernels of the step-derivative activation.

Layout: element ``i`` of the flattened input owns bits ``[(i % P) * BITS, (i % P + 1) * BITS)``
of byte ``i // P``, with ``P = 8 // BITS`` codes per byte. Each program handles
``BLOCK_BYTES`` bytes, i.e. a ``[BLOCK_BYTES, P]`` tile of elements, so that packing is a
row reduction and no two programs write the same byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_approxbp.activations import get_activation
from lightning_approxbp.ops._utils import packed_size, table_tensor
from lightning_approxbp.ops.activation_triton import activation
from lightning_approxbp.ops.kernel_launch import KernelLaunch

# Elements per program, whatever the code width: 8 per thread at 8 warps, which keeps the
# forward's fp32 input, output and codes in registers without spilling.
ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 8


@triton.jit
def _step_activation_fwd_kernel(
    X_ptr,
    Y_ptr,
    CODES_ptr,
    NONFINITE_ptr,
    THRESHOLDS_ptr,
    n_elements,
    n_bytes,
    ACTIVATION: tl.constexpr,
    BITS: tl.constexpr,
    N_THRESHOLDS: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    pid = tl.program_id(0).to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    slots = tl.arange(0, CODES_PER_BYTE)
    offsets = byte_offsets[:, None] * CODES_PER_BYTE + slots[None, :]
    mask = offsets < n_elements

    x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = activation(x, ACTIVATION)
    tl.store(Y_ptr + offsets, y.to(Y_ptr.dtype.element_ty), mask=mask)
    nonfinite = tl.sum(tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1), axis=0)
    if nonfinite > 0:
        tl.atomic_add(NONFINITE_ptr, nonfinite)

    code = tl.zeros([BLOCK_BYTES, CODES_PER_BYTE], dtype=tl.int32)
    for j in tl.static_range(N_THRESHOLDS):
        code += (x > tl.load(THRESHOLDS_ptr + j)).to(tl.int32)
    # Padding slots of the last byte stay zero, as in the PyTorch path.
    code = tl.where(mask, code, 0)
    packed = tl.sum(code << (slots * BITS)[None, :], axis=1)
    tl.store(CODES_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets < n_bytes)


@triton.jit
def _step_activation_bwd_kernel(
    DY_ptr,
    CODES_ptr,
    NONFINITE_ptr,
    LEVELS_ptr,
    DX_ptr,
    n_elements,
    n_bytes,
    BITS: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0).to(tl.int64)
    byte_offsets = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    slots = tl.arange(0, CODES_PER_BYTE)
    offsets = byte_offsets[:, None] * CODES_PER_BYTE + slots[None, :]
    mask = offsets < n_elements

    packed = tl.load(CODES_ptr + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
    code = (packed[:, None] >> (slots * BITS)[None, :]) & CODE_MASK
    level = tl.load(LEVELS_ptr + code)
    # Any non-finite input of the forward poisons the whole gradient, as in the PyTorch path.
    level = tl.where(tl.load(NONFINITE_ptr) > 0, float("nan"), level)
    dy = tl.load(DY_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX_ptr + offsets, (dy * level).to(DX_ptr.dtype.element_ty), mask=mask)


def _block_bytes(bits: int) -> int:
    return ELEMENTS_PER_PROGRAM * bits // 8


def plan_forward(
    x: Tensor, thresholds: list[float], activation: str, bits: int
) -> tuple[KernelLaunch, Tensor, Tensor, Tensor]:
    """The forward launch for a contiguous, non-empty ``x``, and its (output, codes, non-finite
    count) buffers."""
    n_bytes = packed_size(x.numel(), bits)
    block_bytes = _block_bytes(bits)
    y = torch.empty_like(x)
    codes = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    launch = KernelLaunch(
        kernel=_step_activation_fwd_kernel,
        grid=(triton.cdiv(n_bytes, block_bytes),),
        args={
            "X_ptr": x,
            "Y_ptr": y,
            "CODES_ptr": codes,
            "NONFINITE_ptr": nonfinite,
            "THRESHOLDS_ptr": table_tensor(tuple(thresholds), x.device, torch.float32),
            "n_elements": x.numel(),
            "n_bytes": n_bytes,
        },
        constexprs={
            "ACTIVATION": get_activation(activation).kernel_id,
            "BITS": bits,
            "N_THRESHOLDS": len(thresholds),
            "BLOCK_BYTES": block_bytes,
        },
        num_warps=NUM_WARPS,
    )
    return launch, y, codes, nonfinite


def plan_backward(
    grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int
) -> tuple[KernelLaunch, Tensor]:
    """The backward launch for a contiguous, non-empty ``grad_output``, and its result buffer."""
    grad_input = torch.empty_like(grad_output)
    n_bytes = packed.numel()
    block_bytes = _block_bytes(bits)
    launch = KernelLaunch(
        kernel=_step_activation_bwd_kernel,
        grid=(triton.cdiv(n_bytes, block_bytes),),
        args={
            "DY_ptr": grad_output,
            "CODES_ptr": packed,
            "NONFINITE_ptr": nonfinite,
            "LEVELS_ptr": table_tensor(tuple(levels), grad_output.device, torch.float32),
            "DX_ptr": grad_input,
            "n_elements": grad_output.numel(),
            "n_bytes": n_bytes,
        },
        constexprs={"BITS": bits, "BLOCK_BYTES": block_bytes},
        num_warps=NUM_WARPS,
    )
    return launch, grad_input


def forward(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward kernel on a contiguous, non-empty ``x``; returns (output, packed codes,
    non-finite count)."""
    launch, y, codes, nonfinite = plan_forward(x, thresholds, activation, bits)
    launch.run()
    return y, codes, nonfinite


def backward(grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int) -> Tensor:
    """Run the backward kernel on a contiguous, non-empty ``grad_output``."""
    launch, grad_input = plan_backward(grad_output, packed, nonfinite, levels, bits)
    launch.run()
    return grad_input
