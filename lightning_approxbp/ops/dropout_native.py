"""Native CPU launchers of the 1-bit-mask dropout: stock CPU dropout's values in one pass each way.

Forward reads torch's 0/1 noise and the input once and writes the output and the packed mask
(the PyTorch path takes a cast, a packing product, a division and a product). Backward applies
the packed mask to the gradient in one pass. Layouts the flat kernels cannot take (an input
not laid out as its noise, an expanded gradient) run the PyTorch path; the others are dense,
so the kernels read them flat in memory order (permuted layouts included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import packed_size
from lightning_approxbp.ops.dropout import _torch_bits_backward, _torch_bits_forward, kept_value
from lightning_approxbp.ops.native_cpu import kernel, threads


def bits_forward(x: Tensor, noise: Tensor, p: float) -> tuple[Tensor, Tensor]:
    # The noise is dense (empty_like): an input with its strides is dense in the same order.
    if x.stride() != noise.stride():
        return _torch_bits_forward(x, noise, p)
    y = torch.empty_like(noise)
    packed = torch.empty(packed_size(x.numel(), 1), dtype=torch.uint8)
    kept = kept_value(p, x.dtype, x.device).item()
    kernel("dropout_forward", x.dtype)(x.data_ptr(), noise.data_ptr(), x.numel(), kept, y.data_ptr(), packed.data_ptr(), threads())
    return y, packed


def bits_backward(
    grad_output: Tensor, packed: Tensor, p: float, dtype: torch.dtype, shape: torch.Size, strides: tuple[int, ...]
) -> Tensor:
    # ``strides`` are dense (the noise's): a gradient with them is dense in the same order.
    if grad_output.dtype != dtype or grad_output.stride() != strides:
        return _torch_bits_backward(grad_output, packed, p, dtype, shape, strides)
    grad_input = torch.empty_like(grad_output)
    kept = kept_value(p, dtype, grad_output.device).item()
    kernel("dropout_backward", dtype)(grad_output.data_ptr(), packed.data_ptr(), math.prod(shape), kept, grad_input.data_ptr(), threads())
    return grad_input
