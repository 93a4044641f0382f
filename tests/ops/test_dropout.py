"""Dropout that redraws its mask or keeps it as bits: the same masks and gradients as torch's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_approxbp.nn import RegeneratedDropout
from lightning_approxbp.ops import bitpack
from lightning_approxbp.ops.dropout import regenerated_dropout, resolve_mask_storage
from lightning_approxbp.saved_tensors import SavedTensorCounter
from lightning_approxbp.ops import use_backend
from tests.tolerances import IDENTICAL

from .helpers import CPU_BACKENDS


@pytest.fixture(autouse=True, params=CPU_BACKENDS)
def cpu_backend(request):
    """Every test runs on the PyTorch path and on the native CPU kernels."""
    with use_backend(request.param):
        yield request.param


def _run(fn, x, grad, seed=0):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x)
    after_forward = torch.rand(1)  # what the next consumer of the RNG would draw
    y.backward(grad)
    after_backward = torch.rand(1)
    return y, x.grad, after_forward, after_backward


STORAGES = ["regenerate", "bits"]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 64), (0, 4)])
def test_masks_gradients_and_rng_stream_are_those_of_torch(storage, dtype, p, shape):
    x, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    ours = _run(lambda t: regenerated_dropout(t, p, mask_storage=storage), x, grad)
    stock = _run(lambda t: F.dropout(t, p), x, grad)
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **IDENTICAL)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(
    "make", [lambda: torch.randn(6, 9).t(), lambda: torch.randn(2, 5, 9).permute(2, 0, 1), lambda: torch.randn(8, 9)[:, 1:8]]
)
def test_non_contiguous_input(storage, make):
    x = make()
    grad = torch.randn(x.shape)
    ours = _run(lambda t: regenerated_dropout(t, 0.3, mask_storage=storage), x, grad)
    stock = _run(lambda t: F.dropout(t, 0.3), x, grad)
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **IDENTICAL)


@pytest.mark.parametrize("storage", STORAGES)
def test_expanded_gradient(storage):
    x = torch.randn(4, 6)
    grad = torch.randn(1, 6).expand(4, 6)
    ours = _run(lambda t: regenerated_dropout(t, 0.4, mask_storage=storage), x, grad)
    stock = _run(lambda t: F.dropout(t, 0.4), x, grad)
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **IDENTICAL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_per_storage(dtype):
    x = torch.randn(64, 65, dtype=dtype, requires_grad=True)
    counts = {}
    for storage in STORAGES:
        with SavedTensorCounter() as counter:
            regenerated_dropout(x, 0.1, mask_storage=storage)
        counts[storage] = counter.stats.activation_bytes
    with SavedTensorCounter() as stock:
        F.dropout(x, 0.1)
    assert counts == {"regenerate": 0, "bits": -(-x.numel() // 8)}
    assert stock.stats.activation_bytes == x.numel() * x.element_size()  # CPU: the scaled mask


def test_auto_storage_is_bits_on_cpu_and_names_are_checked():
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorCounter() as counter:
        regenerated_dropout(x, 0.1)
    assert counter.stats.activation_bytes == x.numel() // 8
    assert resolve_mask_storage("auto", torch.device("cuda")) == "regenerate"
    with pytest.raises(ValueError, match="mask_storage must be one of"):
        regenerated_dropout(x, 0.1, mask_storage="mask")
    with pytest.raises(ValueError, match="mask_storage must be one of"):
        RegeneratedDropout(0.1, mask_storage="bit")


def test_eval_zero_probability_and_no_grad_are_plain_dropout():
    x = torch.randn(5, requires_grad=True)
    assert torch.equal(regenerated_dropout(x, 0.5, training=False), x)
    assert torch.equal(regenerated_dropout(x, 0.0), x)
    with torch.no_grad():
        torch.manual_seed(0)
        ours = regenerated_dropout(x, 0.5)
        torch.manual_seed(0)
        assert torch.equal(ours, F.dropout(x, 0.5))
    with pytest.raises(ValueError, match="must be in"):
        regenerated_dropout(x, 1.5)


def test_module_is_a_dropout_and_matches_it():
    stock, ours = torch.nn.Dropout(0.2), RegeneratedDropout(0.2)
    assert isinstance(ours, torch.nn.Dropout) and "1 bit per element elsewhere" in repr(ours)
    x, grad = torch.randn(4, 8), torch.randn(4, 8)
    for a, b in zip(_run(ours, x, grad), _run(stock, x, grad)):
        torch.testing.assert_close(a, b, **IDENTICAL)


def test_double_backward_is_refused_clearly():
    x = torch.randn(6, requires_grad=True)
    (grad,) = torch.autograd.grad(regenerated_dropout(x, 0.5).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()


def test_converted_bert_with_dropout_trains_bit_identically():
    transformers = pytest.importorskip("transformers")
    from lightning_approxbp import convert

    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=2, attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(config).train()
    reference = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(0, 128, (2, 12)), "labels": torch.tensor([0, 1])}
    report = convert(model, batch, activations=False, norms=False, gated_mlp=False)
    assert report.max_error == 0.0 and report.bytes_after < report.bytes_before
    assert sum(row.kind == "Dropout" for row in report.converted) == 8
    for m in (model, reference):
        torch.manual_seed(3)
        m(**batch).loss.backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **IDENTICAL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bits_backward_in_chunks_covers_every_element(monkeypatch, dtype):
    monkeypatch.setattr(bitpack, "GATHER_CHUNK", 64)
    for x in (torch.randn(7, 45).to(dtype), torch.randn(45, 7).to(dtype).t()):
        grad = torch.randn(x.shape).to(dtype)
        ours = _run(lambda t: regenerated_dropout(t, 0.3, mask_storage="bits"), x, grad)
        stock = _run(lambda t: F.dropout(t, 0.3), x, grad)
        for a, b in zip(ours, stock):
            torch.testing.assert_close(a, b, **IDENTICAL)


def test_bits_backward_runs_on_fake_tensors_and_leaves_no_fake_in_its_caches():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(8, 16, requires_grad=True)
        regenerated_dropout(x, 0.2, mask_storage="bits").sum().backward()
        assert x.grad.shape == x.shape
    real = torch.randn(8, 16)
    ours = _run(lambda t: regenerated_dropout(t, 0.2, mask_storage="bits"), real, torch.ones(8, 16))
    stock = _run(lambda t: F.dropout(t, 0.2), real, torch.ones(8, 16))
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **IDENTICAL)
