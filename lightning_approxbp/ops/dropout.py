"""Dropout with the same masks and gradients as torch's, keeping (almost) no mask for backward.

Stock dropout saves its mask: CUDA one byte per element, CPU the scaled mask in the input's
dtype (2 or 4 bytes per element). This op keeps one of two things instead, chosen per call:

- ``"regenerate"`` (default on CUDA): the RNG state before the mask is drawn (16 bytes on CUDA,
  the 5 KB generator state on CPU); backward draws the very same mask again with the very same
  call (``torch.dropout`` on the incoming gradient), as ``torch.utils.checkpoint`` does for
  recomputation. Nothing of the input's size is saved; backward pays one random-number pass.
- ``"bits"`` (default elsewhere): the mask itself, packed one bit per element (16x smaller than
  stock's bf16 mask on CPU, 32x than its fp32 one). On CPU torch draws random numbers in one
  serial loop (several ns per element, not vectorised or threaded), so drawing a mask again would
  cost more than the rest of a dropout's forward and backward together; packing costs a few
  vectorised passes over one byte per element.

Either way:

- the masks are bit-identical to ``torch.nn.Dropout``'s under the same RNG state (the forward's
  draw is stock dropout's own), so a converted model reproduces the original's training run (and
  ``seed_everything``) exactly, and conversion-time verification compares like with like;
- the gradient is ``grad * scaled_mask``, bit-identical to stock dropout's, and the global RNG
  stream is that of stock dropout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import guard_double_backward
from lightning_approxbp.ops.dispatch import dispatch
from lightning_approxbp.ops.bitpack import (
    gather_rows,
    multiply_gathered_rows,
    pack_codes,
    unpack_codes,
)

OP_NAME = "dropout"
_NATIVE_BITS_FORWARD = "lightning_approxbp.ops.dropout_native:bits_forward"
_NATIVE_BITS_BACKWARD = "lightning_approxbp.ops.dropout_native:bits_backward"
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
MaskStorage = Literal["auto", "regenerate", "bits"]
MASK_STORAGES: tuple[str, ...] = ("auto", "regenerate", "bits")


def check_mask_storage(storage: str) -> MaskStorage:
    if storage not in MASK_STORAGES:
        raise ValueError(f"mask_storage must be one of {MASK_STORAGES}, got {storage!r}.")
    return storage  # type: ignore[return-value]


def resolve_mask_storage(storage: str, device: torch.device) -> str:
    """``"regenerate"`` or ``"bits"`` for a call on ``device`` (``"auto"``: regenerate on CUDA only)."""
    if check_mask_storage(storage) == "auto":
        return "regenerate" if device.type == "cuda" else "bits"
    return storage


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


# A gather moves rows of 16 bytes fastest (see gather_rows): each packed index covers that many
# bytes of mask values, i.e. 16 // itemsize elements (8 bits of a byte for 16-bit dtypes, a
# nibble for fp32, 2 bits for fp64).
_ROW_BYTES = 16


def _mask_rows(p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Row ``v`` is the scaled mask of the elements whose packed bits are the index ``v``.

    The kept value is stock CPU dropout's ``1 / (1 - p)`` rounded as its ``div_`` rounds it in the
    mask's dtype. Built per call (a few small ops) rather than cached, so that a simulated step on
    fake tensors allocates exactly what a real one does and no cache ever holds a fake tensor.
    """
    width = _ROW_BYTES // dtype.itemsize
    bits = torch.arange(2**width, dtype=torch.int32, device=device).unsqueeze(1) >> torch.arange(
        width, dtype=torch.int32, device=device
    )
    return (bits & 1).to(dtype) * kept_value(p, dtype, device)


class RegeneratedDropoutFunction(torch.autograd.Function):
    """``torch.dropout(x, p, train=True)`` that keeps the RNG state or a 1-bit mask, not the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, storage: str) -> Tensor:  # type: ignore[override]
        ctx.p, ctx.shape, ctx.dtype, ctx.device, ctx.storage = p, x.shape, x.dtype, x.device, storage
        # The mask is drawn in the memory order of torch's empty_like(x): use (or redraw in) that one.
        ctx.strides = torch.empty_like(x, device="meta").stride()
        if storage == "regenerate":
            ctx.rng_state = _rng_state(x.device)
            return torch.dropout(x, p, True)
        if x.device.type != "cpu":
            # What stock dropout runs off CPU (its fused kernel); its bool mask is packed.
            y, mask = torch.native_dropout(x, p, True)
            ctx.strides = mask.stride()
            ctx.save_for_backward(pack_codes(mask.as_strided((mask.numel(),), (1,)).view(torch.uint8), 1))
            return y
        # Stock CPU dropout's own steps (its non-fused path), keeping the 0/1 mask to pack it.
        noise = torch.empty_like(x).bernoulli_(1 - p)
        y, packed = dispatch(OP_NAME, x, _torch_bits_forward, native_launcher=_NATIVE_BITS_FORWARD)(x, noise, p)
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        with torch.no_grad():
            grad_input = _regenerated_grad(ctx, grad_output) if ctx.storage == "regenerate" else _unpacked_grad(ctx, grad_output)
        (grad_input,) = guard_double_backward((grad_input,), grad_output, OP_NAME)
        return grad_input, None, None


def _regenerated_grad(ctx, grad_output: Tensor) -> Tensor:
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
        if ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ctx.rng_state, ctx.device)
        else:
            torch.set_rng_state(ctx.rng_state)
        if grad_output.dtype == ctx.dtype and grad_output.stride() == ctx.strides:
            # The forward's call again, on the gradient itself: it draws the mask in the same
            # memory order and returns ``grad * scaled_mask``, stock dropout's gradient,
            # with no tensor of ones and no separate product.
            return torch.dropout(grad_output, ctx.p, True)
        # Another layout (an expanded gradient): redraw on ones in the forward's layout,
        # which yields the scaled mask itself.
        ones = torch.empty_strided(ctx.shape, ctx.strides, dtype=ctx.dtype, device=ctx.device).fill_(1)
        return grad_output * torch.dropout(ones, ctx.p, True)


def _torch_bits_forward(x: Tensor, noise: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(``x * noise / (1 - p)`` as stock CPU dropout computes it, the noise's 1-bit mask in its memory order)."""
    # Bits in the noise's memory order (its strides are ctx.strides; empty_like makes it dense).
    flat_noise = noise.as_strided((noise.numel(),), (1,))
    # The noise is exactly 0.0 or 1.0: a nonzero bit pattern is a kept element, and the cast
    # of an integer view to bool is vectorised where a 16-bit float comparison is not (30x).
    kept = flat_noise.view(_SAME_SIZE_INT[noise.element_size()]).bool()
    packed = pack_codes(kept.view(torch.uint8), 1)
    return x * noise.div_(1 - p), packed


def kept_value(p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stock CPU dropout's scaled mask value ``1 / (1 - p)``, rounded as its ``div_`` rounds it in ``dtype``."""
    return torch.ones((), dtype=dtype, device=device).div_(1 - p)


def _unpacked_grad(ctx, grad_output: Tensor) -> Tensor:
    (packed,) = ctx.saved_tensors
    numel = math.prod(ctx.shape)
    if ctx.device.type != "cpu":
        mask = unpack_codes(packed, 1, numel).view(torch.bool).as_strided(ctx.shape, ctx.strides)
        return torch.ops.aten.native_dropout_backward(grad_output, mask, 1.0 / (1.0 - ctx.p))
    run = dispatch(OP_NAME, grad_output, _torch_bits_backward, native_launcher=_NATIVE_BITS_BACKWARD)
    return run(grad_output, packed, ctx.p, ctx.dtype, ctx.shape, ctx.strides)


def _torch_bits_backward(
    grad_output: Tensor, packed: Tensor, p: float, dtype: torch.dtype, shape: torch.Size, strides: tuple[int, ...]
) -> Tensor:
    """``grad_output * scaled_mask`` from the 1-bit mask packed in the memory order ``strides``."""
    numel = math.prod(shape)
    table = _mask_rows(p, dtype, grad_output.device)
    width = table.shape[1]
    index = (packed if width == 8 else unpack_codes(packed, width, packed.numel() * 8 // width)).to(torch.int32)
    if grad_output.dtype == dtype and grad_output.stride() == strides:
        # The gradient is laid out as the mask was drawn (the usual case): in memory order, the
        # scaled mask values are gathered and applied chunk by chunk, never all at once.
        flat = multiply_gathered_rows(grad_output.as_strided((numel,), (1,)), table, index)
        return flat.as_strided(shape, strides)
    scaled_mask = gather_rows(table, index).view(-1)[:numel].as_strided(shape, strides)
    return grad_output * scaled_mask


def regenerated_dropout(x: Tensor, p: float = 0.5, training: bool = True, mask_storage: MaskStorage = "auto") -> Tensor:
    """``F.dropout(x, p, training)`` that saves no full mask for backward (see the module docstring).

    Args:
        mask_storage: ``"regenerate"`` (keep the RNG state, redraw in backward), ``"bits"`` (keep a
            1-bit mask) or ``"auto"``: regenerate on CUDA, bits elsewhere.

    Example::

        >>> import torch
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> _ = torch.manual_seed(0); ours = regenerated_dropout(x, 0.25)
        >>> _ = torch.manual_seed(0); stock = torch.nn.functional.dropout(x, 0.25)
        >>> torch.equal(ours, stock)
        True
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}.")
    storage = resolve_mask_storage(mask_storage, x.device)
    # p == 1 zeroes everything: stock dropout then saves a 0-dim zero, nothing to improve on.
    if not training or p in (0.0, 1.0) or x.numel() == 0 or not (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.dropout(x, p, training)
    return RegeneratedDropoutFunction.apply(x, p, storage)
