"""The compute-time merge op: exact gradients, saves only its input."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp.ops.affine_linear import affine_linear
from lightning_approxbp.saved_tensors import SavedTensorCounter


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_beta", [True, False])
def test_gradcheck(transposed: bool, with_beta: bool) -> None:
    double = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(2, 3, 4, **double)
    gamma = torch.randn(4, **double)
    beta = torch.randn(4, **double) if with_beta else None
    weight = torch.randn(4, 5, **double) if transposed else torch.randn(5, 4, **double)
    bias = torch.randn(5, **double)

    def fn(x, gamma, weight, bias, beta=beta):
        return affine_linear(x, gamma, beta, weight, bias, offset=0.5, transposed=transposed)

    assert torch.autograd.gradcheck(fn, (x, gamma, weight, bias))
    if beta is not None:
        assert torch.autograd.gradcheck(lambda b: affine_linear(x, gamma, b, weight, bias, transposed=transposed), (beta,))


def test_saves_only_its_input() -> None:
    layer = torch.nn.Linear(16, 32)
    gamma, beta = torch.nn.Parameter(torch.rand(16)), torch.nn.Parameter(torch.rand(16))
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorCounter(exclude=[*layer.parameters(), gamma, beta]) as counter:
        affine_linear(x, gamma, beta, layer.weight, layer.bias)
    assert counter.stats.activation_bytes == x.numel() * 4


def test_autocast_runs_in_the_autocast_dtype_and_shares_a_bf16_input() -> None:
    layer = torch.nn.Linear(16, 32)
    gamma = torch.nn.Parameter(torch.rand(16))
    x = torch.randn(8, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorCounter(exclude=[*layer.parameters(), gamma]) as c:
        out = affine_linear(x, gamma, None, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and c.stats.activation_bytes == x.numel() * 2
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and gamma.grad.dtype == torch.float32
    expected = torch.nn.functional.linear(x.float() * gamma, layer.weight, layer.bias)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
