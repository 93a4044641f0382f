"""Native CPU launchers of the step activation: the PyTorch path's results from fused C kernels.

Forward: one pass over the input gives the packed codes and the count of non-finite inputs
(the PyTorch path takes a finite check, a code pass and a packing pass). Backward: one pass
over the gradient looks each code's level up and rounds the fp32 product once.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from lightning_approxbp.activations import get_activation
from lightning_approxbp.ops._utils import packed_size
from lightning_approxbp.ops.native_cpu import address, kernel, threads

_INT32_MAX = 2**31 - 1


@lru_cache(maxsize=64)
def padded_thresholds(thresholds: tuple[float, ...], bits: int) -> Tensor:
    """The fp32 thresholds, padded with ``+inf`` to ``2**bits - 1`` (no value exceeds ``+inf``)."""
    slots = (1 << bits) - 1
    if len(thresholds) > slots:
        raise ValueError(f"{len(thresholds)} thresholds do not fit {bits}-bit codes")
    return torch.tensor(thresholds + (float("inf"),) * (slots - len(thresholds)), dtype=torch.float32)


@lru_cache(maxsize=64)
def padded_levels(levels: tuple[float, ...], bits: int) -> Tensor:
    """The fp32 levels, padded to ``2**bits`` entries (codes never reach the padding)."""
    return torch.tensor(levels + (0.0,) * ((1 << bits) - len(levels)), dtype=torch.float32)


def forward(x: Tensor, thresholds: list[float], activation: str, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    entry = get_activation(activation)
    flat = x.view(-1)
    packed = torch.empty(packed_size(flat.numel(), bits), dtype=torch.uint8)
    bounds = padded_thresholds(tuple(thresholds), bits)
    non_finite = kernel(f"step_codes{bits}", x.dtype)(address(flat), flat.numel(), address(bounds), address(packed), threads())
    # The registry's values at infinity cost a select pass: taken only when the kernel saw one.
    y = entry.torch_forward(x) if non_finite else entry.torch_op(x)
    return y, packed, torch.tensor([min(non_finite, _INT32_MAX)], dtype=torch.int32)


def backward(grad_output: Tensor, packed: Tensor, nonfinite: Tensor, levels: list[float], bits: int) -> Tensor:
    table = padded_levels(tuple(levels), bits)
    if nonfinite.item() > 0:
        # A non-finite input poisons the whole gradient, as on the other paths.
        table = torch.full_like(table, float("nan"))
    grad_input = torch.empty_like(grad_output)
    run = kernel(f"step_backward{bits}", grad_output.dtype)
    run(address(grad_output), address(packed), grad_output.numel(), address(table), address(grad_input), threads())
    return grad_input
