"""Triton kernels of the memory-sharing norms.

Forward: one program per row (the whole row in registers), fp32 statistics, output rounded
once. Backward: each program walks a contiguous range of rows, writes their input gradients
and accumulates its own fp32 partial sums of dgamma/dbeta; the host adds the partials
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_approxbp.ops.ms_norm import MAX_FUSED_ROW



@triton.jit
def _ms_norm_fwd_kernel(
    X_ptr,
    X_row_stride,
    Y_ptr,
    Y_row_stride,
    W_ptr,
    B_ptr,
    RSTD_ptr,
    n_cols,
    eps,
    offset,
    CENTERED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTERED:
        mean = tl.sum(x, axis=0) / n_cols
        x = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * (tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset)
    if HAS_BIAS:
        y = y + tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + row, rstd)


@triton.jit
def _ms_norm_bwd_kernel(
    DY_ptr,
    DY_row_stride,
    Y_ptr,
    Y_row_stride,
    RSTD_ptr,
    W_ptr,
    B_ptr,
    DX_ptr,
    DX_row_stride,
    DW_PARTIAL_ptr,
    DB_PARTIAL_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    weight_clamp,
    CENTERED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)

    gamma = tl.full([BLOCK_SIZE], 1.0, tl.float32)
    divisor = gamma
    if HAS_WEIGHT:
        gamma = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        divisor = tl.where(gamma >= 0, tl.maximum(gamma, weight_clamp), tl.minimum(gamma, -weight_clamp))
    beta = tl.zeros([BLOCK_SIZE], tl.float32)
    if HAS_BIAS:
        beta = tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_SIZE], tl.float32)
    db_acc = tl.zeros([BLOCK_SIZE], tl.float32)

    for row in range(row_start, row_end):
        dy = tl.load(DY_ptr + row * DY_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y_ptr + row * Y_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + row)
        x_hat = tl.where(mask, (y - beta) / divisor, 0.0)
        if HAS_WEIGHT:
            dw_acc += dy * x_hat
        if HAS_BIAS:
            db_acc += dy
        dy_hat = dy * gamma
        projection = tl.sum(dy_hat * x_hat, axis=0) / n_cols
        dx = dy_hat - x_hat * projection
        if CENTERED:
            dx = dx - tl.sum(dy_hat, axis=0) / n_cols
        tl.store(DX_ptr + row * DX_row_stride + cols, (dx * rstd).to(DX_ptr.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL_ptr + pid * n_cols + cols, db_acc, mask=mask)


def _block_size(n_cols: int) -> tuple[int, int]:
    block_size = triton.next_power_of_2(n_cols)
    if block_size > MAX_FUSED_ROW:
        raise ValueError(
            f"ms_norm: rows of {n_cols} elements exceed the fused kernel's limit of {MAX_FUSED_ROW}; "
            "use the 'torch' backend for them."
        )
    num_warps = min(max(block_size // 256, 1), 16)
    return block_size, num_warps


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return min(n_rows, 4 * sm_count)
    return min(n_rows, 4)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, centered: bool, offset: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel on a contiguous, non-empty 2-D ``x``."""
    n_rows, n_cols = x.shape
    block_size, num_warps = _block_size(n_cols)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _ms_norm_fwd_kernel[(n_rows,)](
        x,
        x.stride(0),
        y,
        y.stride(0),
        weight,
        bias,
        rstd,
        n_cols,
        eps,
        offset,
        CENTERED=centered,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_SIZE=block_size,
        num_warps=num_warps,
    )
    return y, rstd


def backward(
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
    """Launch the backward kernel; returns (grad_input, grad_weight, grad_bias)."""
    n_rows, n_cols = y.shape
    block_size, num_warps = _block_size(n_cols)
    programs = _backward_programs(n_rows, y.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    grad_input = torch.empty(y.shape, dtype=input_dtype, device=y.device)
    partial_shape = (programs, n_cols)
    dw_partial = torch.empty(partial_shape if weight is not None else 0, dtype=torch.float32, device=y.device)
    db_partial = torch.empty(partial_shape if bias is not None else 0, dtype=torch.float32, device=y.device)
    _ms_norm_bwd_kernel[(programs,)](
        grad_output,
        grad_output.stride(0),
        y,
        y.stride(0),
        rstd,
        weight,
        bias,
        grad_input,
        grad_input.stride(0),
        dw_partial,
        db_partial,
        n_rows,
        n_cols,
        rows_per_program,
        offset,
        weight_clamp,
        CENTERED=centered,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_SIZE=block_size,
        num_warps=num_warps,
    )
    grad_weight = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else dw_partial
    grad_bias = db_partial.sum(dim=0).to(bias.dtype) if bias is not None else db_partial
    return grad_input, grad_weight, grad_bias
