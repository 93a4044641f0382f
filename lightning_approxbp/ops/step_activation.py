"""Step-derivative activation (Approx-BP): exact forward, k-bit codes saved for backward.

Forward computes the original activation exactly and, per element, the index of the
threshold interval it falls in, packed ``8 // bits`` codes per byte (lowest bits first).
Backward multiplies the incoming gradient by ``levels[code]``.

Saved for backward: the packed codes only, ``ceil(numel * bits / 8)`` bytes. The input and the
output are not kept (the table lives on the autograd context as Python numbers).
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_approxbp.ops._utils import (
    check_floating,
    compute_dtype,
    guard_double_backward,
    requires_grad,
    resolve_backend,
)
from lightning_approxbp.ops.reference import ACTIVATIONS
from lightning_approxbp.tables import StepTable

OP_NAME = "step_activation"


def packed_size(numel: int, bits: int) -> int:
    """Bytes that hold ``numel`` codes of ``bits`` bits each."""
    return math.ceil(numel * bits / 8)


def exact_activation(x: Tensor, activation: str) -> Tensor:
    """The unmodified forward, as torch computes it (fp32 internally for 16-bit inputs)."""
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    if activation == "quick_gelu":
        return (x.to(compute_dtype(x.dtype)) * torch.sigmoid(1.702 * x.to(compute_dtype(x.dtype)))).to(x.dtype)
    raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")


@lru_cache(maxsize=64)
def table_tensor(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor, built once per device (tables are immutable)."""
    return torch.tensor(values, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- PyTorch path


# P = 8 // bits codes share a byte. Reading P consecutive one-byte codes as one P-byte
# little-endian word lets a few whole-tensor shifts pack or unpack them all at once, instead of
# a strided reduction that is an order of magnitude slower on CPU.
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16}
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits), lowest bits first, zero-padded."""
    per_byte = 8 // bits
    padded = F.pad(codes, (0, (-codes.numel()) % per_byte))
    if not _LITTLE_ENDIAN:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    words = padded.view(_WORD_DTYPES[per_byte])
    packed = words.clone()
    for slot in range(1, per_byte):
        packed |= words >> ((8 - bits) * slot)
    return (packed & 0xFF).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: a flat uint8 tensor of ``numel`` codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    if not _LITTLE_ENDIAN:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).view(-1)[:numel]
    words = packed.to(_WORD_DTYPES[per_byte])
    spread = words.clone()
    for slot in range(1, per_byte):
        spread |= words << ((8 - bits) * slot)
    byte_mask = int.from_bytes(bytes([mask]) * per_byte, "little")
    return (spread & byte_mask).view(torch.uint8)[:numel]


def _torch_forward(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor]:
    # Compare in fp32: a bf16 comparison would round the thresholds and change codes.
    flat = x.reshape(-1).to(compute_dtype(x.dtype))
    bounds = table_tensor(tuple(thresholds), x.device, compute_dtype(x.dtype))
    codes = torch.zeros(flat.shape, dtype=torch.uint8, device=x.device)
    for threshold in bounds:
        codes += flat > threshold
    return exact_activation(x, activation), pack_codes(codes, bits)


def _torch_backward(grad_output: Tensor, packed: Tensor, levels: list[float], bits: int) -> Tensor:
    table = table_tensor(tuple(levels), grad_output.device, compute_dtype(grad_output.dtype))
    codes = unpack_codes(packed, bits, grad_output.numel())
    multiplier = torch.take(table, codes.long()).view(grad_output.shape)
    return (grad_output.to(multiplier.dtype) * multiplier).to(grad_output.dtype)


# ----------------------------------------------------------------------------- torch.library


@torch.library.custom_op("approxbp::step_activation_forward", mutates_args=())
def step_activation_forward(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor]:
    """Returns (activation output with the shape of ``x``, packed codes)."""
    x = x.contiguous()
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty(0, dtype=torch.uint8, device=x.device)
    if resolve_backend(x, OP_NAME) == "triton":
        from lightning_approxbp.ops import step_activation_triton

        return step_activation_triton.forward(x, thresholds, activation, bits)
    return _torch_forward(x, thresholds, activation, bits)


@step_activation_forward.register_fake
def _(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor]:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty(packed_size(x.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op("approxbp::step_activation_backward", mutates_args=())
def step_activation_backward(grad_output: Tensor, packed: Tensor, levels: list[float], bits: int) -> Tensor:
    """Returns ``grad_output * levels[code]``."""
    # Incoming gradients can be expanded stride-0 views: kernels index by flat offset.
    grad_output = grad_output.contiguous()
    if grad_output.numel() == 0:
        return torch.empty_like(grad_output)
    if resolve_backend(grad_output, OP_NAME) == "triton":
        from lightning_approxbp.ops import step_activation_triton

        return step_activation_triton.backward(grad_output, packed, levels, bits)
    return _torch_backward(grad_output, packed, levels, bits)


@step_activation_backward.register_fake
def _(grad_output: Tensor, packed: Tensor, levels: list[float], bits: int) -> Tensor:
    return torch.empty(grad_output.shape, dtype=grad_output.dtype, device=grad_output.device)


# ----------------------------------------------------------------------------- autograd


class StepActivationFunction(torch.autograd.Function):
    """Exact activation forward, step-function derivative backward.

    Saves for backward: the packed k-bit codes only. Recomputes nothing.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, table: StepTable) -> Tensor:  # type: ignore[override]
        y, packed = step_activation_forward(x, list(table.thresholds), table.activation, table.bits)
        ctx.save_for_backward(packed)
        ctx.table = table
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        table: StepTable = ctx.table
        with torch.no_grad():
            grad_input = step_activation_backward(grad_output, packed, list(table.levels), table.bits)
        (grad_input,) = guard_double_backward((grad_input,), grad_output, OP_NAME)
        return grad_input, None


def step_activation(x: Tensor, table: StepTable) -> Tensor:
    """Apply ``table.activation`` exactly; backpropagate through ``table``'s step derivative.

    Outside autograd (no grad needed) this is the plain activation and saves nothing.
    """
    check_floating(x, OP_NAME)
    if not requires_grad(x):
        return exact_activation(x, table.activation)
    return StepActivationFunction.apply(x, table)
