"""Step-derivative activation: forward exactness, backward vs the fp64 step formula, edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lightning_approxbp import functional as AF
from lightning_approxbp.activations import ACTIVATIONS, get_activation
from lightning_approxbp.nn import ReGELU2, ReSiLU2, StepActivation
from lightning_approxbp.ops import bitpack, packed_size, reference, step_activation, use_backend
from lightning_approxbp.ops.bitpack import pack_codes, unpack_codes
from lightning_approxbp.ops.gated_mlp import gated_product_forward
from lightning_approxbp.ops.reference import step_activation_backward
from lightning_approxbp.tables import SUPPORTED_BITS, get_table
from tests.tolerances import IDENTICAL, PAPER_CONSTRAINT_ABS

from .helpers import CPU_BACKENDS, FLOAT_DTYPES, TRITON_DEVICE, requires_triton

TORCH_FORWARD = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: (x.float() * torch.sigmoid(1.702 * x.float())).to(x.dtype),
}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_round_trip(bits):
    for numel in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == packed_size(numel, bits)
        assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_layout_is_lowest_bits_first():
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_exact_and_backward_is_step_formula(activation, dtype, bits, backend):
    table = get_table(activation, bits)
    x = (torch.randn(3, 37) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 37).to(dtype)
    with use_backend(backend):
        y = AF.step_activation(x, activation, bits=bits)
        (dx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(y, TORCH_FORWARD[activation](x.detach()), **IDENTICAL)
    expected = step_activation_backward(grad, x.detach().double(), table.thresholds, table.levels)
    torch.testing.assert_close(dx, expected.to(dtype))
    assert dx.dtype == dtype


def test_paper_tables_reproduce_published_relu_sums():
    gelu = get_table("gelu", 2, kind="paper")
    a = [-0.04922261145617846, 1.0979632065417297, -0.048740595085551286]
    assert gelu.levels == pytest.approx([0.0, a[0], a[0] + a[1], sum(a)])
    assert sum(a) == pytest.approx(1.0, abs=PAPER_CONSTRAINT_ABS)  # slope 1 for large x, as the paper constrains


@pytest.mark.parametrize("module, activation", [(ReGELU2(), "gelu"), (ReSiLU2(), "silu")])
def test_named_modules_use_paper_tables(module, activation):
    x = torch.randn(64, requires_grad=True)
    module(x).sum().backward()
    table = get_table(activation, 2, kind="paper")
    expected = step_activation_backward(torch.ones(64), x.detach().double(), table.thresholds, table.levels)
    torch.testing.assert_close(x.grad, expected.float())


@pytest.mark.parametrize("shape", [(0,), (5, 0, 3), (1,), (3, 5, 7, 9), (2, 3, 4, 5)])
def test_shapes_including_empty_and_4d(shape):
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    y = AF.step_activation(x)
    y.backward(grad)
    table = get_table("gelu", 2)
    torch.testing.assert_close(y, F.gelu(x.detach()), **IDENTICAL)
    expected = step_activation_backward(grad, x.detach().double(), table.thresholds, table.levels)
    torch.testing.assert_close(x.grad, expected.float())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_in_chunks_covers_every_element(monkeypatch, bits, dtype):
    # Chunks far smaller than the tensor, and a last chunk that ends mid-byte.
    monkeypatch.setattr(bitpack, "GATHER_CHUNK", 64)
    x = (torch.randn(5, 41) * 3).to(dtype).requires_grad_()
    grad = torch.randn(5, 41).to(dtype)
    with use_backend("torch"):
        (dx,) = torch.autograd.grad(AF.step_activation(x, "gelu", bits=bits), x, grad)
    table = get_table("gelu", bits)
    expected = step_activation_backward(grad, x.detach().double(), table.thresholds, table.levels)
    torch.testing.assert_close(dx, expected.to(dtype))


def test_non_contiguous_input_and_expanded_gradient():
    base = torch.randn(6, 10)
    x = base.t().requires_grad_()  # non-contiguous
    y = AF.step_activation(x, "silu")
    torch.testing.assert_close(y, F.silu(x.detach()))
    y.sum().backward()  # the incoming gradient is an expanded stride-0 tensor
    table = get_table("silu", 2)
    expected = step_activation_backward(torch.ones(10, 6), x.detach().double(), table.thresholds, table.levels)
    torch.testing.assert_close(x.grad, expected.float())


def test_fp64_runs_on_the_torch_path():
    x = torch.randn(17, dtype=torch.float64, requires_grad=True)
    AF.step_activation(x).sum().backward()
    assert x.grad.dtype == torch.float64


def test_integer_input_is_rejected_with_accepted_dtypes():
    with pytest.raises(TypeError, match="float32, float16, bfloat16, float64"):
        AF.step_activation(torch.arange(4))


NON_FINITE = [float("nan"), float("inf"), -float("inf")]
BACKENDS = [*CPU_BACKENDS, pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_give_the_documented_values_on_every_backend(activation, dtype, backend):
    """+inf -> +inf, -inf -> 0, NaN -> NaN, whatever torch's kernels do on this CPU.

    3000 elements, so that torch's vectorised CPU kernels (not their scalar tails) see them.
    """
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(3000).mul(3)
    x[[5, 1234, 2999]] = torch.tensor(NON_FINITE)
    x = x.to(device, dtype).requires_grad_()
    with use_backend(backend):
        y = AF.step_activation(x, activation)
        with torch.no_grad():
            y_no_grad = AF.step_activation(x, activation)
    expected = reference.activation_forward(x.detach().cpu(), get_activation(activation).formula)
    for out in (y, y_no_grad):  # no grad: the exact op, on the PyTorch path
        assert out[5].isnan() and out[1234].item() == float("inf") and out[2999].item() == 0.0
        torch.testing.assert_close(out.cpu(), expected.to(dtype), equal_nan=True)


@pytest.mark.parametrize("kind", ["paper", "fitted"])
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_input_makes_the_gradient_non_finite_like_exact_backprop(kind, bad, backend):
    table = get_table("gelu", 2, kind=kind)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(3000, device=device)
    x[1234] = bad
    x.requires_grad_()
    with use_backend(backend):
        y = AF.step_activation(x, table=table)
        y.backward(torch.ones_like(y))
    exact = torch.autograd.grad(F.gelu(x), x, torch.ones_like(x))[0]
    assert exact[1234].isnan()  # what a loss scaler and a divergence check look for
    assert x.grad.isnan().all()  # the codes cannot say which element it was: all of them


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_gated_product_takes_the_same_values_at_infinity(activation, backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    g = torch.randn(4, 1000)
    g[0, 7], g[1, 8], g[2, 9] = NON_FINITE
    u = torch.ones(4, 1000)
    with use_backend(backend):
        h = gated_product_forward(g.to(device), u.to(device), activation).cpu()
    expected = reference.activation_forward(g, get_activation(activation).formula).float()
    torch.testing.assert_close(h, expected, equal_nan=True)
    assert h[0, 7].isnan() and h[1, 8].item() == float("inf") and h[2, 9].item() == 0.0


def test_finite_inputs_keep_finite_gradients_after_a_non_finite_call():
    """The non-finite count belongs to one call: it does not leak into the next one."""
    table = get_table("gelu", 2)
    bad = torch.tensor([float("nan"), 1.0], requires_grad=True)
    AF.step_activation(bad, table=table).sum().backward()
    good = torch.tensor([0.5, 1.0], requires_grad=True)
    AF.step_activation(good, table=table).sum().backward()
    assert bad.grad.isnan().all() and good.grad.isfinite().all()


def test_no_grad_and_inference_save_nothing_and_match_exactly():
    x = torch.randn(10)
    with torch.no_grad():
        torch.testing.assert_close(AF.step_activation(x, "gelu_tanh"), F.gelu(x, approximate="tanh"), **IDENTICAL)


def test_double_backward_raises_clear_error():
    x = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(AF.step_activation(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


def test_table_validation_and_mismatch_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        StepActivation("gelu", bits=3)
    with pytest.raises(ValueError, match="publishes 2-bit tables"):
        get_table("gelu_tanh", 2, kind="paper")
    with pytest.raises(ValueError, match="Unknown activation"):
        StepActivation("relu")
    with pytest.raises(ValueError, match="table is for 'silu'"):
        AF.step_activation(torch.randn(2), "gelu", table=get_table("silu", 2))


def test_autocast_keeps_input_dtype_and_runs():
    x = torch.randn(4, 8, requires_grad=True)
    layer = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = AF.step_activation(layer(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_extra_repr_shows_the_conversion():
    assert "bits=4" in repr(StepActivation("quick_gelu", bits=4, table="fitted"))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_codes_places_every_combination_of_a_byte(bits):
    # Every combination of the codes that share one byte, against the definition of the layout.
    per_byte = 8 // bits
    combos = torch.tensor(list(itertools.product(range(2**bits), repeat=per_byte)), dtype=torch.uint8)
    expected = sum(combos[:, slot].to(torch.int32) << (bits * slot) for slot in range(per_byte)).to(torch.uint8)
    assert torch.equal(pack_codes(combos.reshape(-1), bits), expected)


# Thresholds on, between and beyond the 16-bit values: exactly representable ones, +-0, subnormal
# ones, one past the largest finite fp16 value, and sets of one to three thresholds.
CLAMP_THRESHOLDS = [
    (0.0,), (-0.0,), (1e-30,), (-1e-30,), (65504.0,), (70000.0,),
    (-1.5, 0.7), (-0.0, 1e-30, 3.0), (-3.3e38, 0.1, 3.3e38), (-70000.0, -0.5, 65504.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("thresholds", CLAMP_THRESHOLDS)
def test_clamped_codes_of_every_finite_16_bit_value_are_the_fp32_comparisons(dtype, thresholds):
    patterns = torch.arange(2**16, dtype=torch.int32).to(torch.uint16).view(dtype)
    values = patterns[~patterns.float().isnan()]  # infinities included
    expected = sum((values.float() > t).to(torch.uint8) for t in thresholds)
    assert torch.equal(step_activation.compute_codes(values, thresholds, finite=True), expected)
    assert torch.equal(step_activation.compute_codes(values, thresholds), expected)  # the table path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gathered_products_of_16_bit_gradients_are_rounded_once(monkeypatch, dtype):
    monkeypatch.setattr(bitpack, "GATHER_CHUNK", 64)  # several chunks, the last one partial
    table = torch.randn(256, 4, dtype=torch.float32)
    index = torch.randint(0, 256, (50,), dtype=torch.int32)
    values = torch.randn(197).to(dtype)
    rows = table[index.long()].reshape(-1)[:197]
    expected = (values.float() * rows).to(dtype)  # fp32 product, one rounding to the 16-bit dtype
    assert torch.equal(bitpack.multiply_gathered_rows(values, table, index), expected)
