"""Native CPU launcher of the memory-sharing norm backward (the forward is torch's fused norm).

One C kernel recovers ``x_hat`` from the saved output, forms the input gradient and sums the
affine gradients, reading each row twice while it sits in cache; the PyTorch path makes five
whole-tensor passes and two temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import offset_weight
from lightning_approxbp.ops.ms_norm import _empty_like_optional, _torch_backward, clamp_away_from_zero
from lightning_approxbp.ops.native_cpu import NATIVE_DTYPES, address, kernel, threads



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
    if rstd.dtype != torch.float32 or y.dtype not in NATIVE_DTYPES or input_dtype not in NATIVE_DTYPES:
        return _torch_backward(grad_output, y, rstd, weight, bias, centered, offset, weight_clamp, input_dtype)
    rows, cols = y.shape
    ones = torch.ones(cols)
    gamma = ones if weight is None else offset_weight(weight, torch.float32, offset).contiguous()
    divisor = ones if weight is None else clamp_away_from_zero(gamma, weight_clamp)
    if bias is None:
        shift = torch.zeros(cols)
    else:
        # The PyTorch path's x_hat = y / divisor - beta / divisor.
        shift = bias.to(torch.float32).div(divisor).neg_().contiguous()
    team = threads()
    partial_dgamma = torch.zeros(team, cols)
    partial_dbeta = torch.zeros(team, cols)
    grad_input = torch.empty(y.shape, dtype=input_dtype)
    run = kernel("ms_norm_backward", grad_output.dtype, y.dtype, input_dtype)
    run(
        address(grad_output), address(y), address(rstd), rows, cols,
        address(gamma), address(divisor), address(shift), int(centered),
        address(grad_input), address(partial_dgamma), address(partial_dbeta), team,
    )  # fmt: skip
    grad_weight = _empty_like_optional(weight, y.device) if weight is None else partial_dgamma.sum(0).to(weight.dtype)
    grad_bias = _empty_like_optional(bias, y.device) if bias is None else partial_dbeta.sum(0).to(bias.dtype)
    return grad_input, grad_weight, grad_bias
