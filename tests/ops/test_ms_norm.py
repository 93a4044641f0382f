"""Memory-sharing norms: forward vs torch, backward vs the fp64 output formula and vs autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_approxbp import functional as AF
from lightning_approxbp.nn import MSLayerNorm, MSRMSNorm
from lightning_approxbp.ops import use_backend
from lightning_approxbp.ops.reference import (
    affine_forward,
    layer_norm_forward,
    norm_input_grad_from_output,
    rms_norm_forward,
)
from tests.tolerances import NORM_FROM_OUTPUT, NORM_FROM_OUTPUT_BOUNDED_GAMMA

from .helpers import CPU_BACKENDS, FLOAT_DTYPES, TRITON_DEVICE, requires_triton


def _reference_grads(x, y, grad, weight, bias, centered, offset=0.0):
    """fp64 evaluation of the output formula from the tensors the op saved (y as emitted)."""
    x64 = x.detach().double()
    _, rstd = (layer_norm_forward if centered else rms_norm_forward)(x64, 1e-5)
    dy = grad.double()
    x_hat = y.detach().double()
    grad_weight = grad_bias = None
    if bias is not None:
        x_hat = x_hat - bias.detach().double()
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0)
    if weight is not None:
        gamma = weight.detach().double() + offset
        x_hat = x_hat / gamma
        grad_weight = (dy * x_hat).reshape(-1, dy.shape[-1]).sum(0)
        dy = dy * gamma
    return norm_input_grad_from_output(dy, x_hat, rstd, centered=centered), grad_weight, grad_bias


def _torch_rms_norm(x, weight, eps, offset=0.0):
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * (weight.float() + offset)
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows", [10, 4096], ids=["few_rows", "threaded"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_and_backward_match_references(dtype, affine, centered, rows, backend):
    n = 37
    x = (torch.randn(rows, n) * 2 + 0.5).to(dtype).requires_grad_()
    weight = (torch.rand(n) + 0.5).to(dtype).requires_grad_() if affine else None
    bias = (torch.randn(n) * 0.1).to(dtype).requires_grad_() if affine and centered else None
    grad = torch.randn(rows, n).to(dtype)
    with use_backend(backend):
        if centered:
            y = AF.ms_layer_norm(x, n, weight, bias, eps=1e-5)
            expected = F.layer_norm(x.detach().float(), (n,), _f(weight), _f(bias), eps=1e-5).to(dtype)
        else:
            y = AF.ms_rms_norm(x, n, weight, eps=1e-5)
            expected = _torch_rms_norm(x.detach(), _f(weight), 1e-5)
        inputs = [t for t in (x, weight, bias) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad)
    torch.testing.assert_close(y, expected)
    ref_dx, ref_dw, ref_db = _reference_grads(x, y, grad, weight, bias, centered)
    torch.testing.assert_close(grads[0], ref_dx.to(dtype))
    assert grads[0].dtype == dtype
    # The affine gradients sum over the rows in fp32: over thousands of rows the summation order
    # alone moves an fp32 result by more than fp32's default tolerance (2e-5 relative measured).
    summed = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 and rows > 1000 else {}
    if affine:
        torch.testing.assert_close(grads[1], ref_dw.to(dtype), **summed)
        assert grads[1].dtype == dtype
    if bias is not None:
        torch.testing.assert_close(grads[2], ref_db.to(dtype), **summed)


def _f(t):
    return None if t is None else t.detach().float()


@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_fp32_gradients_equal_torch_autograd(centered):
    n = 64
    x = torch.randn(4, 3, n, requires_grad=True)
    weight = torch.randn(n, requires_grad=True)
    bias = torch.randn(n, requires_grad=True) if centered else None
    grad = torch.randn(4, 3, n)
    inputs = [t for t in (x, weight, bias) if t is not None]
    if centered:
        ours = torch.autograd.grad(AF.ms_layer_norm(x, n, weight, bias), inputs, grad)
        theirs = torch.autograd.grad(F.layer_norm(x, (n,), weight, bias), inputs, grad)
    else:
        ours = torch.autograd.grad(AF.ms_rms_norm(x, n, weight), inputs, grad)
        theirs = torch.autograd.grad(_torch_rms_norm(x, weight, 1e-6), inputs, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **NORM_FROM_OUTPUT[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_affine_free_low_precision_error_is_at_most_twice_torchs_own(dtype, centered):
    """Bound our 16-bit error by PyTorch's own 16-bit error, both against an fp64 truth."""
    n = 256
    x = (torch.randn(64, n) * 3 + 1).to(dtype).requires_grad_()
    grad = torch.randn(64, n).to(dtype)
    x64 = x.detach().double().requires_grad_()

    def torch_norm(t):
        return F.layer_norm(t, (n,)) if centered else _torch_rms_norm(t, None, 1e-5)

    def our_norm(t):
        return AF.ms_layer_norm(t, n) if centered else AF.ms_rms_norm(t, n, eps=1e-5)

    (truth,) = torch.autograd.grad(torch_norm(x64), x64, grad.double())
    (theirs,) = torch.autograd.grad(torch_norm(x), x, grad)
    (ours,) = torch.autograd.grad(our_norm(x), x, grad)
    their_error = (theirs.double() - truth).abs().max()
    our_error = (ours.double() - truth).abs().max()
    assert our_error <= 2 * their_error


def test_offset_rms_norm_matches_gemma_convention():
    n = 16
    x = torch.randn(3, n, requires_grad=True)
    weight = (torch.randn(n) * 0.1).requires_grad_()
    grad = torch.randn(3, n)
    ours = torch.autograd.grad(AF.ms_rms_norm(x, n, weight, offset=1.0), (x, weight), grad)
    theirs = torch.autograd.grad(_torch_rms_norm(x, weight, 1e-6, offset=1.0), (x, weight), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **NORM_FROM_OUTPUT[torch.float32])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_zero_and_tiny_gamma_stay_finite_and_healthy_columns_stay_exact(backend):
    """Where gamma is 0 the normalised value is lost: only those columns' gradients degrade."""
    n = 32
    x = torch.randn(4, n, device=TRITON_DEVICE if backend == "triton" else "cpu", requires_grad=True)
    weight = torch.rand(n, device=x.device) + 0.5
    weight[:4] = 0.0
    weight[4:8] = 1e-7
    weight.requires_grad_()
    bias = torch.randn(n, device=x.device, requires_grad=True)
    grad = torch.randn(4, n, device=x.device)
    with use_backend(backend):
        ours = torch.autograd.grad(AF.ms_layer_norm(x, n, weight, bias), (x, weight, bias), grad)
    theirs = torch.autograd.grad(F.layer_norm(x, (n,), weight, bias), (x, weight, bias), grad)
    for g in ours:
        assert torch.isfinite(g).all()
    healthy = slice(8, None)
    torch.testing.assert_close(ours[0][:, healthy], theirs[0][:, healthy], **NORM_FROM_OUTPUT[torch.float32])
    torch.testing.assert_close(ours[1][healthy], theirs[1][healthy], **NORM_FROM_OUTPUT[torch.float32])
    torch.testing.assert_close(ours[2], theirs[2])


def test_affine_kept_with_healthy_gamma_is_accurate():
    n = 48
    x = torch.randn(8, n, requires_grad=True)
    weight = (torch.rand(n) + 0.5).requires_grad_()
    bias = torch.randn(n, requires_grad=True)
    grad = torch.randn(8, n)
    ours = torch.autograd.grad(AF.ms_layer_norm(x, n, weight, bias), (x, weight, bias), grad)
    theirs = torch.autograd.grad(F.layer_norm(x, (n,), weight, bias), (x, weight, bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **NORM_FROM_OUTPUT[torch.float32])


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8), (8,), (2, 3, 4, 8)])
def test_shapes_including_empty_1d_and_4d(shape):
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    norm, stock = MSLayerNorm(8), torch.nn.LayerNorm(8)
    with torch.no_grad():
        for layer in (norm, stock):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 8))
            layer.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    ours = torch.autograd.grad(norm(x), (x, norm.weight, norm.bias), grad)
    theirs = torch.autograd.grad(stock(x), (x, stock.weight, stock.bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **NORM_FROM_OUTPUT_BOUNDED_GAMMA)


def test_multi_dimensional_normalized_shape():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    ours = AF.ms_layer_norm(x, (4, 5))
    torch.testing.assert_close(ours, F.layer_norm(x, (4, 5)))


def test_non_contiguous_input():
    x = torch.randn(8, 6).t().requires_grad_()
    y = AF.ms_rms_norm(x, 8)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    _torch_rms_norm(x2, None, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **NORM_FROM_OUTPUT[torch.float32])


def test_output_dtype_follows_autocast_and_can_be_forced():
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert AF.ms_layer_norm(x, 16).dtype == torch.bfloat16
        assert AF.ms_layer_norm(x, 16, output_dtype=torch.float32).dtype == torch.float32
    assert AF.ms_layer_norm(x, 16).dtype == torch.float32
    assert AF.ms_layer_norm(x.half(), 16).dtype == torch.float16


def test_fp64_runs_and_bad_input_raises_clearly():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    AF.ms_layer_norm(x, 8).sum().backward()
    assert x.grad.dtype == torch.float64
    with pytest.raises(TypeError, match="must be one of float32"):
        AF.ms_layer_norm(torch.ones(3, 8, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="does not end in normalized_shape"):
        AF.ms_layer_norm(torch.randn(3, 8), 7)
    with pytest.raises(ValueError, match="weight has 4 elements"):
        AF.ms_rms_norm(torch.randn(3, 8), 8, torch.ones(4))


def test_double_backward_raises_clear_error():
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(AF.ms_layer_norm(x, 8).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


def test_modules_keep_state_dict_keys_of_torch_norms():
    assert MSLayerNorm(8).state_dict().keys() == torch.nn.LayerNorm(8).state_dict().keys()
    assert list(MSRMSNorm(8).state_dict()) == ["weight"]
    assert "offset=1.0" in repr(MSRMSNorm(8, offset=1.0))
    assert MSLayerNorm(8, elementwise_affine=False).state_dict() == {}


def test_reference_helpers_agree_with_torch():
    x = torch.randn(3, 10, dtype=torch.float64)
    y, _ = layer_norm_forward(x, 1e-5)
    torch.testing.assert_close(affine_forward(y, None, None), F.layer_norm(x, (10,), eps=1e-5))
