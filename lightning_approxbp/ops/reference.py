"""Reference implementations in plain PyTorch.

These are the formulas every kernel and every fast path is tested against. They favour
clarity over memory: they are meant to run in fp64 on small tensors, and the tests import them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu", "quick_gelu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_QUICK_GELU_ALPHA = 1.702


def activation_forward(x: Tensor, activation: str) -> Tensor:
    """Exact forward of ``activation`` in the dtype of ``x``."""
    if activation == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
    if activation == "silu":
        return x * torch.sigmoid(x)
    if activation == "quick_gelu":
        return x * torch.sigmoid(_QUICK_GELU_ALPHA * x)
    raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")


def activation_derivative(x: Tensor, activation: str) -> Tensor:
    """Exact derivative h'(x), used to fit step tables and to measure their error."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return cdf + x * pdf
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
    if activation in ("silu", "quick_gelu"):
        alpha = 1.0 if activation == "silu" else _QUICK_GELU_ALPHA
        s = torch.sigmoid(alpha * x)
        return s + alpha * x * s * (1.0 - s)
    raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")


def step_codes(x: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Interval index of every element: the number of thresholds strictly below it.

    NaN compares false with everything, so NaN gets code 0.
    """
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold in thresholds:
        codes += (x > threshold).to(torch.uint8)
    return codes


def step_derivative(x: Tensor, thresholds: Sequence[float], levels: Sequence[float]) -> Tensor:
    """The step function that replaces h'(x) in Approx-BP, in fp64."""
    table = torch.tensor(levels, dtype=torch.float64, device=x.device)
    return table[step_codes(x, thresholds).long()]


def step_activation_backward(
    grad_output: Tensor, x: Tensor, thresholds: Sequence[float], levels: Sequence[float]
) -> Tensor:
    """Approx-BP input gradient: ``grad_output * level[code(x)]``, computed in fp64."""
    return grad_output.double() * step_derivative(x, thresholds, levels)


def layer_norm_forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Affine-free LayerNorm over the last dimension: returns (y, rstd)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mean) * rstd, rstd.squeeze(-1)


def rms_norm_forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Affine-free RMSNorm over the last dimension: returns (y, rstd)."""
    rstd = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return x * rstd, rstd.squeeze(-1)


def norm_input_grad_from_output(
    grad_y_hat: Tensor, y_hat: Tensor, rstd: Tensor, *, centered: bool
) -> Tensor:
    """Input gradient of an affine-free norm written with its output alone (MS-BP).

    LayerNorm (``centered``): ``rstd * (dy - mean(dy) - y * mean(dy * y))``;
    RMSNorm: ``rstd * (dy - y * mean(dy * y))``.
    """
    projection = (grad_y_hat * y_hat).mean(dim=-1, keepdim=True)
    dx = grad_y_hat - y_hat * projection
    if centered:
        dx = dx - grad_y_hat.mean(dim=-1, keepdim=True)
    return dx * rstd.unsqueeze(-1)


def affine_forward(y_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    out = y_hat if weight is None else y_hat * weight
    return out if bias is None else out + bias

