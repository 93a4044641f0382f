"""Triton kernels against the PyTorch path (CPU: Triton's interpreter; GPU: compiled kernels)."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.activations import ACTIVATIONS
from lightning_approxbp.ops import ms_norm_triton, use_backend
from lightning_approxbp.ops.ms_norm import ms_norm_backward, ms_norm_forward
from lightning_approxbp.ops.step_activation import step_activation_forward
from lightning_approxbp.tables import SUPPORTED_BITS, get_table
from tests.tolerances import (
    TRITON_VS_TORCH,
    TRITON_VS_TORCH_BIAS_ONLY,
    TRITON_VS_TORCH_GRAD,
    TRITON_VS_TORCH_GRAD_VIA_FP32,
)

from .helpers import FLOAT_DTYPES, TRITON_DEVICE, requires_triton

pytestmark = requires_triton


def _both_paths(fn, *tensors):
    results = {}
    for backend in ("torch", "triton"):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        with use_backend(backend):
            results[backend] = (fn(*inputs), inputs)
    return results


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [1, 5, 1003, 8195])
def test_codes_are_bit_identical(bits, numel):
    table = get_table("gelu", bits)
    x = torch.randn(numel, device=TRITON_DEVICE) * 3
    x[: min(numel, 3)] = torch.tensor(table.thresholds[:1] * 3, device=TRITON_DEVICE)[: min(numel, 3)]
    packed = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            _, packed[backend], _ = step_activation_forward(x, list(table.thresholds), "gelu", bits)
    assert torch.equal(packed["torch"], packed["triton"])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_step_activation_outputs_and_gradients_agree(activation, dtype):
    x = (torch.randn(3, 347, device=TRITON_DEVICE) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 347, device=TRITON_DEVICE).to(dtype)

    def run(t):
        y = AF.step_activation(t, activation, bits=2)
        return y, torch.autograd.grad(y, t, grad)[0]

    results = _both_paths(run, x)
    (y_torch, dx_torch), _ = results["torch"]
    (y_triton, dx_triton), _ = results["triton"]
    torch.testing.assert_close(y_triton, y_torch, **TRITON_VS_TORCH[dtype])
    torch.testing.assert_close(dx_triton, dx_torch, **TRITON_VS_TORCH[dtype])


@pytest.fixture(params=["fused", "looped"])
def row_kernel(request, monkeypatch) -> str:
    """Run the norm kernels fused (row in registers) or looped (row walked in 64-wide chunks)."""
    if request.param == "looped":
        monkeypatch.setattr(ms_norm_triton, "FUSED_MAX_BLOCK", 16)
        monkeypatch.setattr(ms_norm_triton, "MIN_BLOCK", 16)
        monkeypatch.setattr(ms_norm_triton, "LOOPED_BLOCK", 64)
    return request.param


def test_row_config_switches_to_the_looped_kernel_past_the_fused_width():
    fused = ms_norm_triton.row_config(ms_norm_triton.FUSED_MAX_BLOCK)
    looped = ms_norm_triton.row_config(ms_norm_triton.FUSED_MAX_BLOCK + 1)
    assert not fused.looped and fused.block_size == ms_norm_triton.FUSED_MAX_BLOCK
    assert looped.looped and looped.block_size == ms_norm_triton.LOOPED_BLOCK


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n_rows, n_cols", [(1, 37), (13, 100), (6, 256)])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "rms_norm_offset"])
@pytest.mark.parametrize("affine", [False, True])
def test_ms_norm_kernels_agree(dtype, n_rows, n_cols, kind, affine, row_kernel):
    """Forward outputs, then backward from the SAME saved tensors (so that one-unit output
    differences from the interpreter's rounding are not amplified by cancellation)."""
    device = TRITON_DEVICE
    x = (torch.randn(n_rows, n_cols, device=device) * 2 + 1).to(dtype)
    weight = (torch.rand(n_cols, device=device) + 0.5).to(dtype) if affine else None
    bias = (torch.randn(n_cols, device=device) * 0.1).to(dtype) if affine and kind == "layer_norm" else None
    centered = kind == "layer_norm"
    offset = 1.0 if kind == "rms_norm_offset" else 0.0
    grad = torch.randn(n_rows, n_cols, device=device).to(dtype)
    forward, backward = {}, {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            forward[backend] = ms_norm_forward(x, weight, bias, 1e-5, centered, offset, dtype)
    y, rstd = forward["torch"]
    for backend in ("torch", "triton"):
        with use_backend(backend):
            backward[backend] = ms_norm_backward(grad, y, rstd, weight, bias, centered, offset, 1e-4, dtype)

    torch.testing.assert_close(forward["triton"][0], y, **TRITON_VS_TORCH[dtype])
    torch.testing.assert_close(forward["triton"][1], rstd)
    names = ("grad_input", "grad_weight", "grad_bias")
    for name, ours, theirs in zip(names, backward["triton"], backward["torch"]):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, **TRITON_VS_TORCH_GRAD[dtype], msg=name)


def test_ms_norm_emits_the_requested_dtype_on_triton():
    x = torch.randn(4, 64, device=TRITON_DEVICE, requires_grad=True)
    with use_backend("triton"):
        y = AF.ms_layer_norm(x, 64, output_dtype=torch.bfloat16)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


def test_forced_triton_refuses_fp64_and_explains():
    with use_backend("triton"), pytest.raises(TypeError, match="float64 runs on the 'torch' backend"):
        AF.step_activation(torch.randn(4, dtype=torch.float64, device=TRITON_DEVICE, requires_grad=True))


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="CPU-only message")
def test_forced_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="Set TRITON_INTERPRET=1"):
        AF.step_activation(torch.randn(4, requires_grad=True))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="Unknown backend"), use_backend("cuda"):
        pass


@pytest.mark.parametrize(
    "in_dtype, out_dtype",
    [(torch.bfloat16, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_ms_norm_dtype_pairs_the_kernels_do_not_take_directly_go_through_fp32(in_dtype, out_dtype, row_kernel):
    x = (torch.randn(5, 100, device=TRITON_DEVICE) * 2 + 1).to(in_dtype)
    weight = torch.rand(100, device=TRITON_DEVICE) + 0.5
    bias = torch.randn(100, device=TRITON_DEVICE) * 0.1
    grad = torch.randn(5, 100, device=TRITON_DEVICE).to(out_dtype)
    forward, backward = {}, {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            forward[backend] = ms_norm_forward(x, weight, bias, 1e-5, True, 0.0, out_dtype)
    y, rstd = forward["torch"]
    for backend in ("torch", "triton"):
        with use_backend(backend):
            backward[backend] = ms_norm_backward(grad, y, rstd, weight, bias, True, 0.0, 1e-4, in_dtype)
    assert forward["triton"][0].dtype == out_dtype and backward["triton"][0].dtype == in_dtype
    torch.testing.assert_close(forward["triton"][0], y, **TRITON_VS_TORCH[out_dtype])
    for ours, theirs in zip(backward["triton"], backward["torch"]):
        torch.testing.assert_close(ours, theirs, **TRITON_VS_TORCH_GRAD_VIA_FP32)


def test_ms_norm_bias_without_weight_matches_the_torch_path(row_kernel):
    x = torch.randn(7, 100, device=TRITON_DEVICE, requires_grad=True)
    bias = torch.randn(100, device=TRITON_DEVICE, requires_grad=True)
    grad = torch.randn(7, 100, device=TRITON_DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        inputs = (x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_())
        with use_backend(backend):
            y = AF.ms_layer_norm(inputs[0], 100, None, inputs[1])
            results[backend] = (y, *torch.autograd.grad(y, inputs, grad))
    for ours, theirs in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, theirs, **TRITON_VS_TORCH_BIAS_ONLY)
