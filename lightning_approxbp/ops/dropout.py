"""Dropout that keeps no mask for backward: it keeps the random-number generator's state.

Stock dropout saves its mask (CUDA: one byte per element; CPU: the scaled mask in the input's
dtype). This op saves nothing of the input's size: it records the RNG state before drawing the
mask (16 bytes on CUDA, the 5 KB generator state on CPU, per call) and, in backward, draws the
very same mask again with the very same call (``torch.dropout`` on a tensor of ones), as
``torch.utils.checkpoint`` does for recomputation. Consequences:

- the masks are bit-identical to ``torch.nn.Dropout``'s under the same RNG state, so a
  converted model reproduces the original's training run (and ``seed_everything``) exactly,
  and conversion-time verification compares like with like;
- the gradient is ``grad * mask / (1 - p)``, bit-identical to stock dropout's;
- the backward pass redraws the mask: one random-number pass over the input's size (drawn on
  the incoming gradient itself, so the redraw and the product are one call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import guard_double_backward

OP_NAME = "dropout"


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class RegeneratedDropoutFunction(torch.autograd.Function):
    """``torch.dropout(x, p, train=True)`` that saves the RNG state instead of the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.rng_state = _rng_state(x.device)
        ctx.p, ctx.shape, ctx.dtype, ctx.device = p, x.shape, x.dtype, x.device
        # The mask is drawn in the memory order of torch's empty_like(x): redraw it in the same one.
        ctx.strides = torch.empty_like(x, device="meta").stride()
        return torch.dropout(x, p, True)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            if ctx.device.type == "cuda":
                torch.cuda.set_rng_state(ctx.rng_state, ctx.device)
            else:
                torch.set_rng_state(ctx.rng_state)
            if grad_output.dtype == ctx.dtype and grad_output.stride() == ctx.strides:
                # The forward's call again, on the gradient itself: it draws the mask in the same
                # memory order and returns ``grad * scaled_mask``, stock dropout's gradient,
                # with no tensor of ones and no separate product.
                grad_input = torch.dropout(grad_output, ctx.p, True)
            else:
                # Another layout (an expanded gradient): redraw on ones in the forward's layout,
                # which yields the scaled mask itself.
                ones = torch.empty_strided(ctx.shape, ctx.strides, dtype=ctx.dtype, device=ctx.device).fill_(1)
                grad_input = grad_output * torch.dropout(ones, ctx.p, True)
        (grad_input,) = guard_double_backward((grad_input,), grad_output, OP_NAME)
        return grad_input, None


def regenerated_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` that saves no mask for backward (see the module docstring).

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
    if not training or p == 0.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.dropout(x, p, training)
    return RegeneratedDropoutFunction.apply(x, p)
