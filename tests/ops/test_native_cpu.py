"""Native CPU kernels: bit for bit the PyTorch path's results, and a build that fails cleanly."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.activations import ACTIVATIONS
from lightning_approxbp.ops import native_cpu, step_activation, step_activation_native, use_backend
from lightning_approxbp.ops.bitpack import pack_codes
from lightning_approxbp.ops.dispatch import resolve_backend
from lightning_approxbp.tables import SUPPORTED_BITS, get_table

from .helpers import FLOAT_DTYPES, requires_native

pytestmark = requires_native


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (payloads differ between kernels)."""
    return a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codes_of_every_16_bit_value_are_the_pytorch_paths(dtype, activation, bits):
    """All 65,536 patterns (NaNs, infinities, subnormals, both zeros), one odd-length tail."""
    thresholds = get_table(activation, bits).thresholds
    values = torch.arange(-(2**15), 2**15 + 3, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = pack_codes(step_activation.compute_codes(values, tuple(thresholds)), bits)
    _, packed, non_finite = step_activation_native.forward(values, list(thresholds), activation, bits)
    assert torch.equal(packed, expected)
    assert non_finite.item() == int((~values.isfinite()).sum())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 8, 9, 4095, 4097, 70001])
def test_fp32_codes_at_every_tail_length_and_across_chunks(bits, length):
    thresholds = get_table("gelu", bits).thresholds
    values = torch.randn(length) * 3
    values[::97] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, thresholds[0]]).repeat(length)[: len(values[::97])]
    expected = pack_codes(step_activation.compute_codes(values, tuple(thresholds)), bits)
    _, packed, non_finite = step_activation_native.forward(values, list(thresholds), "gelu", bits)
    assert torch.equal(packed, expected)
    assert non_finite.item() == int((~values.isfinite()).sum())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [13, 300_001])  # serial, and threaded with a tail
def test_step_activation_forward_and_backward_equal_the_pytorch_paths(dtype, bits, numel):
    x = (torch.randn(numel) * 3).to(dtype)
    grad = torch.randn(numel).to(dtype)
    results = {}
    for backend in ("torch", "native"):
        leaf = x.clone().requires_grad_()
        with use_backend(backend):
            y = AF.step_activation(leaf, "gelu", bits=bits)
            (dx,) = torch.autograd.grad(y, leaf, grad)
        results[backend] = (y, dx)
    for ours, theirs in zip(results["native"], results["torch"]):
        assert _same_values(ours, theirs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_non_finite_input_makes_the_whole_native_gradient_nan(dtype):
    x = torch.randn(100).to(dtype)
    x[17] = float("inf")
    x.requires_grad_()
    with use_backend("native"):
        (dx,) = torch.autograd.grad(AF.step_activation(x, "gelu"), x, torch.ones_like(x))
    assert dx.isnan().all()


@pytest.mark.parametrize("input_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("output_dtype", FLOAT_DTYPES)
def test_norm_backward_with_mixed_dtypes_matches_the_pytorch_path(input_dtype, output_dtype):
    """Under autocast a norm reads fp32 and emits 16 bits: every pairing of the kernel's dtypes."""
    x = (torch.randn(300, 64) * 2 + 0.5).to(input_dtype)
    weight, bias = torch.rand(64) + 0.5, torch.randn(64) * 0.1
    grad = torch.randn(300, 64).to(output_dtype)
    results = {}
    for backend in ("torch", "native"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with use_backend(backend):
            y = AF.ms_layer_norm(leaves[0], 64, leaves[1], leaves[2], eps=1e-5, output_dtype=output_dtype)
            results[backend] = torch.autograd.grad(y, leaves, grad)
    for ours, theirs in zip(results["native"], results["torch"]):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)


def test_auto_runs_native_kernels_on_cpu_floats_only():
    assert resolve_backend(torch.ones(2, dtype=torch.bfloat16), "op", has_native=True) == "native"
    assert resolve_backend(torch.ones(2, dtype=torch.float64), "op", has_native=True) == "torch"
    assert resolve_backend(torch.ones(2, device="meta"), "op", has_native=True) == "torch"
    assert resolve_backend(torch.ones(2), "op", has_native=False) == "torch"
    with use_backend("torch"):
        assert resolve_backend(torch.ones(2), "op", has_native=True) == "torch"


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """The library built anew into an empty cache; the default one is restored afterwards."""
    monkeypatch.setenv("APPROXBP_NATIVE_CACHE", str(tmp_path))
    native_cpu._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native_cpu._library.cache_clear()
    assert native_cpu.native_available()


def test_without_a_compiler_auto_falls_back_and_forcing_says_why(fresh_library, monkeypatch):
    monkeypatch.setenv("APPROXBP_CC", "no-such-compiler")
    assert not native_cpu.native_available()
    assert resolve_backend(torch.ones(2), "op", has_native=True) == "torch"
    x = torch.randn(8, requires_grad=True)
    with use_backend("native"), pytest.raises(native_cpu.NativeUnavailable, match="APPROXBP_CC"):
        AF.step_activation(x, "gelu")


def test_a_build_is_cached_and_reused(fresh_library):
    first = native_cpu._build(threaded=True)
    assert first.parent == fresh_library and first.exists()
    modified = first.stat().st_mtime_ns
    assert native_cpu._build(threaded=True) == first and first.stat().st_mtime_ns == modified
    assert [path.name for path in fresh_library.iterdir()] == [first.name]  # no scratch left behind


def test_the_serial_build_gives_the_same_codes(fresh_library):
    """Where torch's OpenMP runtime is not libgomp.so.1 the kernels are built without threads."""
    import ctypes

    serial = ctypes.CDLL(str(native_cpu._build(threaded=False)))
    native_cpu._declare(serial)
    x = (torch.randn(300_001) * 3).to(torch.bfloat16)
    thresholds = get_table("gelu", 2).thresholds
    bounds = step_activation_native.padded_thresholds(tuple(thresholds), 2)
    packed = torch.empty((x.numel() + 3) // 4, dtype=torch.uint8)
    serial.step_codes2_bf16(x.data_ptr(), x.numel(), bounds.data_ptr(), packed.data_ptr(), 2)
    assert torch.equal(packed, pack_codes(step_activation.compute_codes(x, tuple(thresholds)), 2))
