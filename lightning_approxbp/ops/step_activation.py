"""Step-derivative activation (Approx-BP): exact forward, k-bit codes saved for backward.

Forward computes the original activation exactly and, per element, the index of the
threshold interval it falls in, packed ``8 // bits`` codes per byte (lowest bits first).
Backward multiplies the incoming gradient by ``levels[code]``.

Saved for backward: the packed codes, ``ceil(numel * bits / 8)`` bytes, and one int32 count of
non-finite inputs (4 bytes). The input and the output are not kept (the table lives on the
autograd context as Python numbers).

Non-finite inputs: the forward takes the registry's values (``+inf`` at ``+inf``, ``0`` at
``-inf``, NaN at NaN; see :mod:`lightning_approxbp.activations`). Exact backprop gives a NaN
gradient at a NaN or infinite input, which then spreads through the previous layer's weight
gradient, so divergence shows and fp16 loss scaling skips the step. The codes cannot say which elements were non-finite, so when the count
is not zero the whole input gradient of this call is NaN: the same end state for the weights,
without a host synchronisation or extra memory.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from lightning_approxbp.activations import get_activation, known_finite
from lightning_approxbp.ops._utils import (
    call_op,
    check_floating,
    compute_dtype,
    guard_double_backward,
    packed_size,
    requires_grad,
    table_tensor,
)
from lightning_approxbp.ops import bitpack
from lightning_approxbp.ops.bitpack import multiply_gathered_rows, pack_codes
from lightning_approxbp.ops.dispatch import dispatch
from lightning_approxbp.tables import StepTable

OP_NAME = "step_activation"
_TRITON_KERNELS = "lightning_approxbp.ops.step_activation_triton"
_NATIVE_KERNELS = "lightning_approxbp.ops.step_activation_native"


def exact_activation(x: Tensor, activation: str) -> Tensor:
    """The unmodified forward, as torch computes it (fp32 internally for 16-bit inputs), with the
    registry's values at infinity."""
    return get_activation(activation).torch_forward(x)


# ----------------------------------------------------------------------------- PyTorch path


# A 16-bit input has 65,536 possible values: a table from each bit pattern to its code gives
# every element's code in one gather, for any number of thresholds, where comparing takes one
# pass per threshold. Built by comparing the values in fp32 with the fp32 thresholds, exactly as
# the comparisons would (NaN patterns get code 0, infinities the end codes).
_CODE_TABLE_DTYPES = (torch.bfloat16, torch.float16)
# torch's gather is one serial loop (~0.4 ns per element); int16 clamps and adds are vectorised
# and threaded (~0.02 ns per byte). Up to three thresholds (1- and 2-bit codes), the three
# passes per threshold below cost less than the gather: measured 0.44 vs 0.72 ms per BERT-base
# GELU input (1.6M bf16) on a 2-core AVX512 CPU; with more thresholds the gather wins.
_MAX_CLAMPED_THRESHOLDS = 3


@lru_cache(maxsize=64)
def code_table(thresholds: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Row ``b`` is the code of the ``dtype`` value whose bits are ``b`` (a 65,536-entry uint8 table)."""
    values = torch.arange(2**16, dtype=torch.int32).to(torch.uint16).view(dtype).float()
    bounds = torch.tensor(thresholds, dtype=torch.float32)
    codes = (values.unsqueeze(1) > bounds).sum(dim=1, dtype=torch.uint8)
    return codes.to(device)


def order_keys(bits: Tensor) -> Tensor:
    """A new int16 tensor whose order is the order of the 16-bit floats with these bits (NaNs aside).

    A float's sign-magnitude pattern, read as int16, is ordered for positive values and reversed
    for negative ones: flipping the magnitude bits of the negative patterns fixes that
    (``-0`` gets the key just below ``+0``'s).
    """
    keys = bits >> 15
    return keys.bitwise_and_(0x7FFF).bitwise_xor_(bits)


@lru_cache(maxsize=64)
def threshold_keys(thresholds: tuple[float, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """Per threshold, the largest key of a non-NaN ``dtype`` value that is not above it (fp32 compare).

    A non-NaN element exceeds the threshold exactly when its key exceeds this one.
    """
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    keys = order_keys(bits).to(torch.int32)
    comparable = ~values.isnan()
    return tuple(int(keys[comparable & (values <= threshold)].max()) for threshold in thresholds)


def _clamped_codes(flat: Tensor, thresholds: tuple[float, ...]) -> Tensor:
    """Codes of a NaN-free 16-bit ``flat`` by clamps of its order keys: ``clamp(key, K, K + 1) - K``
    is 1 above the threshold's key ``K`` and 0 at or below it (no int16 overflow: ``K + 1`` is
    at most the key of ``+inf``)."""
    keys = order_keys(flat.view(torch.int16))
    first, *rest = threshold_keys(thresholds, flat.dtype)
    codes = torch.clamp(keys, first, first + 1).sub_(first)
    step = torch.empty_like(keys) if rest else None
    for key in rest:
        codes.add_(torch.clamp(keys, key, key + 1, out=step)).sub_(key)
    return codes.to(torch.uint8)


def compute_codes(flat: Tensor, thresholds: tuple[float, ...], finite: bool = False) -> Tensor:
    """The number of thresholds strictly below each element (NaN: 0), as flat uint8.

    ``finite=True`` promises that ``flat`` holds no NaN, which lets 16-bit inputs with few
    thresholds take vectorised clamps instead of the table gather.
    """
    if flat.dtype in _CODE_TABLE_DTYPES:
        if finite and 0 < len(thresholds) <= _MAX_CLAMPED_THRESHOLDS:
            return _clamped_codes(flat, thresholds)
        # Bits as indices: uint16 -> int32 is one widening pass; index_select takes int32. Chunk
        # by chunk, so that the int32 indices (twice the input's bytes) stay in cache and no
        # buffer of that size is allocated (fresh large buffers cost page faults on CPU).
        table = code_table(thresholds, flat.dtype, flat.device)
        bits = flat.view(torch.uint16)
        codes = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
        chunk = bitpack.GATHER_CHUNK
        for start in range(0, flat.numel(), chunk):
            stop = start + chunk
            torch.index_select(table, 0, bits[start:stop].to(torch.int32), out=codes[start:stop])
        return codes
    bounds = table_tensor(thresholds, flat.device, flat.dtype)
    # A bool tensor viewed as uint8 is its 0/1 values without a conversion pass; the sums
    # accumulate in place into the first comparison's bytes.
    codes = (flat > bounds[0]).view(torch.uint8)
    for threshold in bounds[1:]:
        codes += (flat > threshold).view(torch.uint8)
    return codes


def _torch_forward(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    entry = get_activation(activation)
    flat = x.reshape(-1)
    # Compare in fp32 (fp64 for fp64): a 16-bit comparison would round the thresholds and
    # change codes. The code table does the same comparisons once per bit pattern.
    if flat.dtype not in _CODE_TABLE_DTYPES:
        flat = flat.to(compute_dtype(x.dtype))
    finite = known_finite(flat)
    if finite:
        # One reduction ruled out non-finite inputs: no count to take, no values to fix.
        y = entry.torch_op(x)
        nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        y = entry.torch_forward(x)
        nonfinite = (~torch.isfinite(flat)).sum(dtype=torch.int32).reshape(1)
    return y, pack_codes(compute_codes(flat, tuple(thresholds), finite), bits), nonfinite


@lru_cache(maxsize=64)
def byte_levels(levels: tuple[float, ...], bits: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 256-row table: row ``b`` holds the levels of the ``8 // bits`` codes packed in byte ``b``.

    Looking packed bytes up in it yields every element's level in one gather, with no
    unpacking pass.
    """
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    rows = [[levels[(byte >> (bits * slot)) & mask] for slot in range(per_byte)] for byte in range(256)]
    return torch.tensor(rows, dtype=dtype, device=device)


def _torch_backward(grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int) -> Tensor:
    table = byte_levels(tuple(levels), bits, grad_output.device, compute_dtype(grad_output.dtype))
    # A non-finite input anywhere poisons the whole gradient (see the module docstring); on the
    # 256-row table, so it costs no pass over the gradient.
    table = torch.where(nonfinite > 0, float("nan"), table)
    # The product in the table's dtype (fp32 for 16-bit gradients), rounded once into the
    # gradient's dtype.
    grad_input = multiply_gathered_rows(grad_output.view(-1), table, packed.to(torch.int32))
    return grad_input.view(grad_output.shape)


# ----------------------------------------------------------------------------- torch.library


def _step_activation_forward(
    x: Tensor, thresholds: list[float], activation: str, bits: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (activation output with the shape of ``x``, packed codes, count of non-finite inputs)."""
    x = x.contiguous()
    if x.numel() == 0:
        empty_codes = torch.empty(0, dtype=torch.uint8, device=x.device)
        return torch.empty_like(x), empty_codes, torch.zeros(1, dtype=torch.int32, device=x.device)
    run = dispatch(OP_NAME, x, _torch_forward, f"{_TRITON_KERNELS}:forward", f"{_NATIVE_KERNELS}:forward")
    return run(x, thresholds, activation, bits)


step_activation_forward = torch.library.custom_op("approxbp::step_activation_forward", mutates_args=())(_step_activation_forward)


@step_activation_forward.register_fake
def _(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty(packed_size(x.numel(), bits), dtype=torch.uint8), x.new_empty(1, dtype=torch.int32)


def _step_activation_backward(
    grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int
) -> Tensor:
    """Returns ``grad_output * levels[code]`` (all NaN when ``nonfinite`` counts any input)."""
    # Incoming gradients can be expanded stride-0 views: kernels index by flat offset.
    grad_output = grad_output.contiguous()
    if grad_output.numel() == 0:
        return torch.empty_like(grad_output)
    run = dispatch(OP_NAME, grad_output, _torch_backward, f"{_TRITON_KERNELS}:backward", f"{_NATIVE_KERNELS}:backward")
    return run(grad_output, packed, nonfinite, levels, bits)


step_activation_backward = torch.library.custom_op("approxbp::step_activation_backward", mutates_args=())(_step_activation_backward)


@step_activation_backward.register_fake
def _(grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int) -> Tensor:
    return torch.empty(grad_output.shape, dtype=grad_output.dtype, device=grad_output.device)


# ----------------------------------------------------------------------------- autograd


class StepActivationFunction(torch.autograd.Function):
    """Exact activation forward, step-function derivative backward.

    Saves for backward: the packed k-bit codes and a 4-byte count of non-finite inputs.
    Recomputes nothing.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, table: StepTable) -> Tensor:  # type: ignore[override]
        y, packed, nonfinite = call_op(
            step_activation_forward, _step_activation_forward, x, list(table.thresholds), table.activation, table.bits
        )
        ctx.save_for_backward(packed, nonfinite)
        ctx.table = table
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        packed, nonfinite = ctx.saved_tensors
        table: StepTable = ctx.table
        with torch.no_grad():
            grad_input = call_op(
                step_activation_backward, _step_activation_backward, grad_output, packed, nonfinite, list(table.levels), table.bits
            )
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
