"""Triton kernels of the memory-sharing norms.

Two shapes of kernel, chosen per row length by :func:`row_config`:

- **fused** (rows up to ``FUSED_MAX_BLOCK``): the whole row lives in registers; the forward reads
  the input once, the backward reads ``dy`` and ``y`` once.
- **looped** (longer rows, any length): the row is walked in ``LOOPED_BLOCK``-wide chunks, two or
  three times (statistics, then output), re-reading from cache. Registers stay bounded, so the
  kernels do not spill at any width; the extra passes hit L1/L2.

Statistics are fp32 and the output is rounded once. Backward programs each walk a contiguous
range of rows, write those rows' input gradients and keep their own fp32 partial sums of
dgamma/dbeta (in registers when fused, in the program's own row of the partial buffer when
looped); the host adds the partials (deterministic, no atomics).

The kernels take the (input, output) dtype pairs in ``NATIVE_DTYPE_PAIRS`` and fp32 affine
parameters; the launchers convert anything else on the host, so that the set of compiled
specialisations stays small enough to compile ahead of time in CI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_approxbp.ops.kernel_launch import KernelLaunch

# (input dtype, output dtype) pairs the kernels read and write directly: what 32-true,
# 16-/bf16-mixed autocast and 16-/bf16-true training produce. Other pairs go through fp32.
NATIVE_DTYPE_PAIRS: frozenset[tuple[torch.dtype, torch.dtype]] = frozenset(
    {
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    }
)
# Rows up to this block stay in registers; the widths were chosen with the ahead-of-time
# compile check (no spills on sm_80/sm_90 in any dtype, see docs/ops.md).
FUSED_MAX_BLOCK = 4096
MIN_BLOCK = 256
LOOPED_BLOCK = 2048
LOOPED_WARPS = 8


@dataclass(frozen=True)
class RowConfig:
    """How a row of a given length is processed: chunk width, warps, and looped or fused."""

    block_size: int
    num_warps: int
    looped: bool


def row_config(n_cols: int) -> RowConfig:
    """The kernel shape for rows of ``n_cols`` elements (forward and backward use the same)."""
    block_size = max(triton.next_power_of_2(n_cols), MIN_BLOCK)
    if block_size > FUSED_MAX_BLOCK:
        return RowConfig(LOOPED_BLOCK, LOOPED_WARPS, looped=True)
    return RowConfig(block_size, num_warps=min(max(block_size // 256, 1), 8), looped=False)


# ----------------------------------------------------------------------------- forward


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
        y = y * (tl.load(W_ptr + cols, mask=mask, other=0.0) + offset)
    if HAS_BIAS:
        y = y + tl.load(B_ptr + cols, mask=mask, other=0.0)
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + row, rstd)


@triton.jit
def _ms_norm_fwd_looped_kernel(
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
    x_row = X_ptr + row * X_row_stride
    y_row = Y_ptr + row * Y_row_stride
    # Two-pass statistics (mean, then centred squares), as in the fused kernel: a one-pass
    # sum of squares would lose the variance of rows with a large mean.
    mean = 0.0
    if CENTERED:
        total = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            total += tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / n_cols
    squares = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        squares += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        y = (tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y = y * (tl.load(W_ptr + cols, mask=mask, other=0.0) + offset)
        if HAS_BIAS:
            y = y + tl.load(B_ptr + cols, mask=mask, other=0.0)
        tl.store(y_row + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + row, rstd)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _recover_normalised(y, gamma, beta, weight_clamp, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x_hat from the saved output: (y - beta) / gamma, gamma clamped away from zero (sign kept)."""
    x_hat = y
    if HAS_BIAS:
        x_hat = x_hat - beta
    if HAS_WEIGHT:
        x_hat = x_hat / tl.where(gamma >= 0, tl.maximum(gamma, weight_clamp), tl.minimum(gamma, -weight_clamp))
    return x_hat


# Row counts only bound loops: specialising on their values (a 1 would become a constant)
# would only add compiled variants.
@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
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
    if HAS_WEIGHT:
        gamma = tl.load(W_ptr + cols, mask=mask, other=0.0) + offset
    beta = tl.zeros([BLOCK_SIZE], tl.float32)
    if HAS_BIAS:
        beta = tl.load(B_ptr + cols, mask=mask, other=0.0)
    dw_acc = tl.zeros([BLOCK_SIZE], tl.float32)
    db_acc = tl.zeros([BLOCK_SIZE], tl.float32)

    for row in range(row_start, row_end):
        dy = tl.load(DY_ptr + row * DY_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y_ptr + row * Y_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + row)
        x_hat = tl.where(mask, _recover_normalised(y, gamma, beta, weight_clamp, HAS_WEIGHT, HAS_BIAS), 0.0)
        if HAS_WEIGHT:
            dw_acc += dy * x_hat
        if HAS_BIAS:
            db_acc += dy
        dy_hat = dy * gamma
        dx = dy_hat - x_hat * (tl.sum(dy_hat * x_hat, axis=0) / n_cols)
        if CENTERED:
            dx = dx - tl.sum(dy_hat, axis=0) / n_cols
        tl.store(DX_ptr + row * DX_row_stride + cols, (dx * rstd).to(DX_ptr.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL_ptr + pid * n_cols + cols, db_acc, mask=mask)


@triton.jit
def _chunk(
    dy_row, y_row, W_ptr, B_ptr, cols, mask, offset, weight_clamp,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One chunk of a row, for the looped backward: ``(dy, gamma, x_hat)`` in fp32."""
    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.full([BLOCK_SIZE], 1.0, tl.float32)
    if HAS_WEIGHT:
        gamma = tl.load(W_ptr + cols, mask=mask, other=0.0) + offset
    beta = tl.zeros([BLOCK_SIZE], tl.float32)
    if HAS_BIAS:
        beta = tl.load(B_ptr + cols, mask=mask, other=0.0)
    return dy, gamma, tl.where(mask, _recover_normalised(y, gamma, beta, weight_clamp, HAS_WEIGHT, HAS_BIAS), 0.0)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _ms_norm_bwd_looped_kernel(
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
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dw_row = DW_PARTIAL_ptr + pid * n_cols
    db_row = DB_PARTIAL_ptr + pid * n_cols
    # The program's own partial rows of dgamma/dbeta start at zero; each row adds to them.
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, tl.zeros([BLOCK_SIZE], tl.float32), mask=cols < n_cols)
        if HAS_BIAS:
            tl.store(db_row + cols, tl.zeros([BLOCK_SIZE], tl.float32), mask=cols < n_cols)

    for row in range(row_start, row_end):
        dy_row = DY_ptr + row * DY_row_stride
        y_row = Y_ptr + row * Y_row_stride
        rstd = tl.load(RSTD_ptr + row)
        # Pass 1: the two row sums the input gradient needs.
        projection = tl.zeros([BLOCK_SIZE], tl.float32)
        dy_total = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            dy, gamma, x_hat = _chunk(
                dy_row, y_row, W_ptr, B_ptr, cols, mask, offset, weight_clamp, HAS_WEIGHT, HAS_BIAS, BLOCK_SIZE
            )
            dy_hat = dy * gamma
            projection += dy_hat * x_hat
            dy_total += dy_hat
        projection_mean = tl.sum(projection, axis=0) / n_cols
        dy_mean = tl.sum(dy_total, axis=0) / n_cols
        # Pass 2: the input gradient, and this row's share of dgamma/dbeta added to the
        # program's own partial rows (no other program touches them: no atomics needed).
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            dy, gamma, x_hat = _chunk(
                dy_row, y_row, W_ptr, B_ptr, cols, mask, offset, weight_clamp, HAS_WEIGHT, HAS_BIAS, BLOCK_SIZE
            )
            dx = dy * gamma - x_hat * projection_mean
            if CENTERED:
                dx = dx - dy_mean
            tl.store(DX_ptr + row * DX_row_stride + cols, (dx * rstd).to(DX_ptr.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, dw + dy * x_hat, mask=mask)
            if HAS_BIAS:
                db = tl.load(db_row + cols, mask=mask, other=0.0)
                tl.store(db_row + cols, db + dy, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return min(n_rows, 4 * sm_count)
    return min(n_rows, 4)


def _affine_operands(weight: Tensor | None, bias: Tensor | None, n_cols: int, device: torch.device):
    """fp32 parameters for the kernels; a bias without a weight gets a unit weight."""
    weight32 = None if weight is None else weight.to(torch.float32).contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    if bias32 is not None and weight32 is None:
        weight32 = torch.ones(n_cols, dtype=torch.float32, device=device)
    return weight32, bias32


def plan_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, centered: bool, offset: float, out_dtype: torch.dtype
) -> tuple[KernelLaunch, Tensor, Tensor]:
    """The forward launch for a contiguous, non-empty 2-D ``x``, and its (output, rstd) buffers.

    The output buffer may be fp32 where ``(x.dtype, out_dtype)`` is not a native pair; the
    caller casts it (:func:`forward` does).
    """
    n_rows, n_cols = x.shape
    if (x.dtype, out_dtype) not in NATIVE_DTYPE_PAIRS:
        x = x.to(torch.float32)
        out_dtype = out_dtype if (torch.float32, out_dtype) in NATIVE_DTYPE_PAIRS else torch.float32
    weight32, bias32 = _affine_operands(weight, bias, n_cols, x.device)
    config = row_config(n_cols)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    launch = KernelLaunch(
        kernel=_ms_norm_fwd_looped_kernel if config.looped else _ms_norm_fwd_kernel,
        grid=(n_rows,),
        args={
            "X_ptr": x,
            "X_row_stride": x.stride(0),
            "Y_ptr": y,
            "Y_row_stride": y.stride(0),
            "W_ptr": weight32,
            "B_ptr": bias32,
            "RSTD_ptr": rstd,
            "n_cols": n_cols,
            "eps": eps,
            "offset": offset,
        },
        constexprs={
            "CENTERED": centered,
            "HAS_WEIGHT": weight32 is not None,
            "HAS_BIAS": bias32 is not None,
            "BLOCK_SIZE": config.block_size,
        },
        num_warps=config.num_warps,
    )
    return launch, y, rstd


def plan_backward(
    grad_output: Tensor,
    y: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    centered: bool,
    offset: float,
    weight_clamp: float,
    input_dtype: torch.dtype,
) -> tuple[KernelLaunch, Tensor, Tensor, Tensor]:
    """The backward launch and its (grad_input, dgamma partials, dbeta partials) buffers.

    grad_input may be fp32 where ``(input_dtype, y.dtype)`` is not a native pair; the caller
    casts it (:func:`backward` does).
    """
    n_rows, n_cols = y.shape
    if grad_output.dtype != y.dtype or (input_dtype, y.dtype) not in NATIVE_DTYPE_PAIRS:
        grad_output, y, input_dtype = grad_output.to(torch.float32), y.to(torch.float32), torch.float32
    weight32, bias32 = _affine_operands(weight, bias, n_cols, y.device)
    config = row_config(n_cols)
    programs = _backward_programs(n_rows, y.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    grad_input = torch.empty(y.shape, dtype=input_dtype, device=y.device)
    partial_shape = (programs, n_cols)
    dw_partial = torch.empty(partial_shape if weight32 is not None else 0, dtype=torch.float32, device=y.device)
    db_partial = torch.empty(partial_shape if bias32 is not None else 0, dtype=torch.float32, device=y.device)
    launch = KernelLaunch(
        kernel=_ms_norm_bwd_looped_kernel if config.looped else _ms_norm_bwd_kernel,
        grid=(programs,),
        args={
            "DY_ptr": grad_output,
            "DY_row_stride": grad_output.stride(0),
            "Y_ptr": y,
            "Y_row_stride": y.stride(0),
            "RSTD_ptr": rstd,
            "W_ptr": weight32,
            "B_ptr": bias32,
            "DX_ptr": grad_input,
            "DX_row_stride": grad_input.stride(0),
            "DW_PARTIAL_ptr": dw_partial,
            "DB_PARTIAL_ptr": db_partial,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "rows_per_program": rows_per_program,
            "offset": offset,
            "weight_clamp": weight_clamp,
        },
        constexprs={
            "CENTERED": centered,
            "HAS_WEIGHT": weight32 is not None,
            "HAS_BIAS": bias32 is not None,
            "BLOCK_SIZE": config.block_size,
        },
        num_warps=config.num_warps,
    )
    return launch, grad_input, dw_partial, db_partial


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, centered: bool, offset: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel on a contiguous, non-empty 2-D ``x``; returns (output, rstd)."""
    launch, y, rstd = plan_forward(x, weight, bias, eps, centered, offset, out_dtype)
    launch.run()
    return y.to(out_dtype), rstd


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
    """Run the backward kernel; returns (grad_input, grad_weight, grad_bias)."""
    launch, grad_input, dw_partial, db_partial = plan_backward(
        grad_output, y, rstd, weight, bias, centered, offset, weight_clamp, input_dtype
    )
    launch.run()
    grad_weight = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else torch.empty(0, device=y.device)
    grad_bias = db_partial.sum(dim=0).to(bias.dtype) if bias is not None else torch.empty(0, device=y.device)
    return grad_input.to(input_dtype), grad_weight, grad_bias
