"""The compute-time merge op: exact gradients, saves only its input."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp.ops.affine_linear import affine_linear
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import IDENTICAL, ROUNDING


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
    torch.testing.assert_close(out.float(), expected, **ROUNDING[torch.bfloat16])


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_share_input_saves_the_given_tensor_and_gives_bit_identical_gradients(transposed: bool) -> None:
    """An fp32 input under bf16 autocast: saved by reference (no bf16 copy), cast again in backward."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 24) if transposed else torch.randn(24, 16))
    bias = torch.nn.Parameter(torch.randn(24))
    x = torch.randn(2, 7, 16, requires_grad=True)
    grad = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    results = {}
    for share in (False, True):
        saved: list[torch.Tensor] = []
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t
        ):
            out = affine_linear(x, None, None, weight, bias, transposed=transposed, share_input=share)
        activations = [t for t in saved if t.untyped_storage().data_ptr() not in (weight.data_ptr(), bias.data_ptr())]
        results[share] = (out, *torch.autograd.grad(out, (x, weight, bias), grad), activations)
    (out0, *grads0, saved0), (out1, *grads1, saved1) = results[False], results[True]
    assert [t.dtype for t in saved0] == [torch.bfloat16]
    assert len(saved1) == 1 and saved1[0] is x
    assert torch.equal(out0, out1)
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)


def test_share_input_keeps_its_own_copy_of_an_input_outside_the_graph() -> None:
    """No norm saved a no-grad input (e.g. behind frozen embeddings): keep the narrow bf16 copy."""
    weight = torch.nn.Parameter(torch.randn(24, 16))
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorCounter(exclude=[weight]) as counter:
        affine_linear(x, None, None, weight, None, share_input=True)
    assert counter.stats.bytes_by_dtype == {"bfloat16": x.numel() * 2}


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
def test_autocast_gradients_are_the_formula_in_fp32_rounded_once(input_dtype: torch.dtype) -> None:
    """Under bf16 autocast: ``grad_x = fp32(grad_z) * (gamma + offset)`` rounded once into the input's
    dtype, bit for bit, and ``gamma``/``beta`` get the fp32 sums over rows of that widened ``grad_z``."""
    torch.manual_seed(0)
    offset = 0.5
    weight = torch.nn.Parameter(torch.randn(24, 16))
    gamma, beta = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    x = torch.randn(3, 5, 16).to(input_dtype).requires_grad_()
    grad = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = affine_linear(x, gamma, beta, weight, None, offset=offset)
    grad_x, grad_gamma, grad_beta = torch.autograd.grad(out, (x, gamma, beta), grad)

    grad_z = (grad.reshape(-1, 24) @ weight.bfloat16()).double()  # the op's own bf16 matmul, widened exactly
    scale = (gamma + offset).detach().double()  # the fp32 sum, widened exactly
    # An fp32 product of a bf16 and an fp32 value is exact in fp64 and correctly rounded in fp32.
    expected_x = (grad_z * scale).float().to(input_dtype).view_as(x)
    torch.testing.assert_close(grad_x, expected_x, **IDENTICAL)
    x_c = x.detach().bfloat16().double().reshape(-1, 16)
    torch.testing.assert_close(grad_gamma, (grad_z * x_c).sum(0).float(), **ROUNDING[torch.float32])
    torch.testing.assert_close(grad_beta, grad_z.sum(0).float(), **ROUNDING[torch.float32])
