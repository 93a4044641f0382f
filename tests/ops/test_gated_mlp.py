"""The gated down projection: exact gradients against fp64 autograd, on both paths, saving g and u only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_approxbp.activations import ACTIVATIONS, get_activation
from lightning_approxbp.ops import use_backend
from lightning_approxbp.ops.gated_mlp import gated_down_projection
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import VS_FP64_RELATIVE

from .helpers import FLOAT_DTYPES, TRITON_DEVICE, requires_triton

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]

def _fp64_reference(g, u, weight, bias, grad, activation):
    tensors = [t.detach().double().requires_grad_() for t in (g, u, weight, bias)]
    out = F.linear(get_activation(activation).formula(tensors[0]) * tensors[1], tensors[2], tensors[3])
    return out, torch.autograd.grad(out, tensors, grad.double())


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_outputs_and_gradients_match_fp64_autograd(backend, activation, dtype):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    generator = torch.Generator().manual_seed(0)
    g, u = (torch.randn(3, 5, 37, generator=generator).mul(2).to(device, dtype) for _ in range(2))
    weight = torch.randn(11, 37, generator=generator).div(6).to(device, dtype)
    bias = torch.randn(11, generator=generator).to(device, dtype)
    grad = torch.randn(3, 5, 11, generator=generator).to(device, dtype)
    inputs = [t.clone().requires_grad_() for t in (g, u, weight, bias)]
    with use_backend(backend):
        out = gated_down_projection(*inputs, activation=activation)
        ours = torch.autograd.grad(out, inputs, grad)
    expected_out, expected = _fp64_reference(g, u, weight, bias, grad, activation)
    assert out.dtype == dtype
    assert _relative(out, expected_out) < VS_FP64_RELATIVE[dtype]
    for name, a, b in zip(("g", "u", "weight", "bias"), ours, expected):
        assert a.dtype == dtype and _relative(a, b) < VS_FP64_RELATIVE[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_g_and_u_under_autocast_and_emits_the_autocast_dtype(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    g = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8, 40, device=device, requires_grad=True)
    with use_backend(backend), SavedTensorCounter(exclude=[weight]) as counter:
        with torch.autocast(device if device != "cuda" else "cuda", dtype=torch.bfloat16):
            out = gated_down_projection(g, u, weight, activation="silu")
    assert out.dtype == torch.bfloat16
    assert counter.stats.bytes_by_dtype == {"bfloat16": 2 * g.numel() * 2}  # g and u, nothing else
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and g.grad.dtype == torch.bfloat16


def test_non_contiguous_inputs_empty_batches_and_bad_shapes():
    base_g, base_u = torch.randn(16, 5), torch.randn(16, 5)
    g, u = base_g.t().requires_grad_(), base_u.t().requires_grad_()  # non-contiguous
    weight = torch.randn(3, 16)
    out = gated_down_projection(g, u, weight, activation="gelu")
    torch.testing.assert_close(out, F.linear(F.gelu(g.detach()) * u.detach(), weight))
    out.sum().backward()  # an expanded, stride-0 incoming gradient
    expected = torch.autograd.grad(F.linear(F.gelu(g) * u, weight).sum(), (g, u))
    torch.testing.assert_close(g.grad, expected[0])
    torch.testing.assert_close(u.grad, expected[1])
    empty = torch.randn(0, 16, requires_grad=True)
    assert gated_down_projection(empty, empty, weight).shape == (0, 3)
    with pytest.raises(ValueError, match="weight must be"):
        gated_down_projection(g, u, torch.randn(3, 7))
    with pytest.raises(ValueError, match="Unknown activation"):
        gated_down_projection(g, u, weight, activation="relu")


def test_double_backward_is_refused_clearly():
    g = torch.randn(2, 4, requires_grad=True)
    out = gated_down_projection(g, torch.randn(2, 4), torch.randn(3, 4))
    (grad,) = torch.autograd.grad(out.sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()
