"""What the ops keep for backward, counted storage by storage."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.nn import MSLayerNorm, MSRMSNorm, StepActivation
from lightning_approxbp.ops import packed_size
from lightning_approxbp.saved_tensors import SavedTensorCounter, count_saved_bytes
from lightning_approxbp.tables import SUPPORTED_BITS


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [1, 999, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_activation_keeps_only_packed_codes_and_a_non_finite_count(bits, numel, dtype):
    x = torch.randn(numel, dtype=dtype, requires_grad=True)
    stats = count_saved_bytes(StepActivation("gelu", bits=bits), x)
    assert packed_size(numel, bits) == -(-numel * bits // 8)
    assert stats.bytes_by_dtype == {"uint8": packed_size(numel, bits), "int32": 4}


def test_two_bit_codes_are_eight_times_smaller_than_bf16_input():
    x = torch.randn(4096, dtype=torch.bfloat16, requires_grad=True)
    stock = count_saved_bytes(torch.nn.GELU(), x).activation_bytes
    ours = count_saved_bytes(StepActivation("gelu", bits=2), x).bytes_by_dtype["uint8"]
    assert stock == 8 * ours


@pytest.mark.parametrize("norm_cls", [MSLayerNorm, MSRMSNorm])
def test_ms_norm_and_linear_share_one_bf16_activation_under_autocast(norm_cls):
    rows, width, out_features = 6, 64, 32
    x = torch.randn(rows, width, requires_grad=True)
    norm, linear = norm_cls(width), torch.nn.Linear(width, out_features)
    with SavedTensorCounter(exclude=[*norm.parameters(), *linear.parameters()]) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(norm(x))
    weight_copy = 2 * width * out_features  # autocast's bf16 copy of the linear weight
    assert counter.stats.bytes_by_dtype == {"bfloat16": 2 * rows * width + weight_copy, "float32": 4 * rows}


def test_stock_layer_norm_and_linear_keep_an_extra_fp32_input():
    rows, width, out_features = 6, 64, 32
    x = torch.randn(rows, width, requires_grad=True)
    norm, linear = torch.nn.LayerNorm(width), torch.nn.Linear(width, out_features)
    with SavedTensorCounter(exclude=[*norm.parameters(), *linear.parameters()]) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(norm(x))
    assert counter.stats.bytes_by_dtype["float32"] >= 4 * rows * width
    assert counter.stats.bytes_by_dtype["bfloat16"] == 2 * rows * width + 2 * width * out_features


def test_affine_free_norm_keeps_output_and_rstd_only():
    x = torch.randn(5, 3, 16, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorCounter() as counter:
        AF.ms_layer_norm(x, 16)
    assert counter.stats.bytes_by_dtype == {"bfloat16": 2 * x.numel(), "float32": 4 * 15}


def test_nothing_is_saved_without_grad():
    with torch.no_grad():
        assert count_saved_bytes(MSLayerNorm(8), torch.randn(4, 8)).activation_bytes == 0
    assert count_saved_bytes(StepActivation(), torch.randn(4, 8)).activation_bytes == 0


def test_counter_counts_views_of_one_storage_once():
    x = torch.randn(8, 8, requires_grad=True)
    with SavedTensorCounter() as counter:
        y = x * 2
        (y[:4] * y[4:]).sum()
    assert counter.stats.activation_bytes == 4 * 64  # two views saved, one storage counted


def test_counting_keeps_no_graph_alive_and_leaves_gradients_unchanged() -> None:
    """A probe that never runs backward must free its graph (and the weights it reaches) when dropped."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    weight = weakref.ref(layer.weight)
    with SavedTensorCounter() as counter:
        out = layer(torch.randn(3, 8, requires_grad=True)).exp()  # exp saves its output
    assert counter.stats.activation_bytes > 0
    del out, layer
    gc.collect()
    assert weight() is None

    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    grads = []
    for counting in (False, True):
        layer.zero_grad()
        with SavedTensorCounter() if counting else contextlib.nullcontext():
            out = layer(x).exp().sum()
        out.backward()
        grads.append(layer.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
