"""Reference implementations in plain PyTorch.

These are the formulas every kernel and every fast path is tested against. They favour
clarity over memory: they are meant to run in fp64 on small tensors, and the tests import them.
No library code depends on this module. The activations' own formulas and derivatives are in
:mod:`lightning_approxbp.activations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def activation_forward(x: Tensor, formula: Callable[[Tensor], Tensor]) -> Tensor:
    """An activation in fp64 from its elementary ``formula``, with the documented values at
    infinity: ``+inf`` at ``+inf``, ``0`` at ``-inf`` (where ``x * cdf(x)`` is ``-inf * 0``).

    Elementwise selects only, so the result does not depend on the CPU's vector unit.
    """
    wide = x.double()
    y = formula(wide)
    y = torch.where(wide == float("inf"), wide, y)
    return torch.where(wide == -float("inf"), torch.zeros_like(y), y)


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



def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_softcap: float | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target)``, logits soft-capped when asked, full logits."""
    # F.linear, not ``hidden @ weight.T + bias``: under autocast it is what nn.Linear runs (the bias
    # added in the autocast dtype), so the reference's own bf16 error is that of an eager head.
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    ).view(target.shape if reduction == "none" else ())
