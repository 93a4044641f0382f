"""The fused linear + cross-entropy against the fp64 full-logits reference, on both paths."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.ops import linear_cross_entropy as lce
from lightning_approxbp.ops import reference, use_backend
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import (
    BF16_LOSS_VS_FP64,
    IDENTICAL,
    SUMMATION_ORDER_FP64,
    SUMMATION_ORDER_FP64_LOSS,
    TRITON_VS_TORCH_LINEAR_CROSS_ENTROPY_BF16,
    VS_FP64,
)

from .helpers import TRITON_DEVICE, requires_triton

# Odd token counts, chunks that do not divide them, vocabularies that are no multiple of anything.
SHAPES = [(13, 16, 37, 4), (7, 24, 101, 3), (32, 8, 1000, 32)]


@pytest.fixture(params=["16-bit products", "upcast products"])
def cpu_products(request, monkeypatch):
    """Both ways the CPU path accumulates 16-bit products in fp32, whichever this CPU would pick: an
    oracle that holds for both cannot depend on the CPU's vector unit."""
    sixteen_bit = request.param == "16-bit products"
    monkeypatch.setattr(lce, "sixteen_bit_products", lambda device, dtype: sixteen_bit)
    return request.param


def _inputs(tokens, hidden, vocab, dtype=torch.float32, *, bias=True, ignored=(), device="cpu"):
    h = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, dtype=dtype, device=device) / hidden**0.5).requires_grad_()
    b = torch.randn(vocab, dtype=dtype, device=device, requires_grad=True) if bias else None
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[list(ignored)] = -100
    return h, w, b, target


def _loss_and_grads(fn, h, w, b, target, grad=None, **options):
    loss = fn(h, w, target, b, **options)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, loss.new_ones(()) * 1.7 if grad is None else grad)
    return loss, grads


def _reference(h, w, b, target, grad=None, **options):
    fp64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b)]
    return _loss_and_grads(reference.linear_cross_entropy, *fp64, target, grad, **options)


@pytest.mark.parametrize("dtype", list(VS_FP64))
@pytest.mark.parametrize("tokens, hidden, vocab, chunk", SHAPES)
@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, None), (0.1, None), (0.0, 2.5), (0.2, 4.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_match_the_fp64_reference(dtype, tokens, hidden, vocab, chunk, reduction,
                                                     label_smoothing, softcap, bias):
    h, w, b, target = _inputs(tokens, hidden, vocab, dtype, bias=bias, ignored=(0, 5))
    grad = torch.randn(tokens, dtype=dtype) if reduction == "none" else None
    options = {"reduction": reduction, "label_smoothing": label_smoothing, "logit_softcap": softcap}
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, grad, chunk_size=chunk, **options)
    ref_loss, ref_grads = _reference(h, w, b, target, None if grad is None else grad.double(), **options)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **VS_FP64[dtype])
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, **VS_FP64[dtype], msg=name)


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 64, None])
def test_the_chunk_size_does_not_change_the_result(chunk):
    h, w, b, target = _inputs(13, 16, 37, torch.float64, ignored=(3,))
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, chunk_size=chunk)
    ref_loss, ref_grads = _reference(h, w, b, target)
    torch.testing.assert_close(loss, ref_loss, **SUMMATION_ORDER_FP64_LOSS)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, **SUMMATION_ORDER_FP64)


@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
def test_whole_chunks_ignored_and_every_token_ignored(reduction):
    """Ignored rows add nothing; with every token ignored ``mean`` is nan (0/0) with zero
    gradients, ``sum`` is 0, exactly as ``F.cross_entropy``."""
    h, w, b, target = _inputs(12, 8, 30, torch.float64, ignored=range(4, 8))  # the second chunk of 4
    grad = torch.randn(12, dtype=torch.float64) if reduction == "none" else None
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, grad, chunk_size=4, reduction=reduction)
    ref_loss, ref_grads = _reference(h, w, b, target, grad, reduction=reduction)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.all(grads[0][4:8] == 0)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs)

    target.fill_(-100)
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, grad, chunk_size=4, reduction=reduction)
    ref_loss, ref_grads = _reference(h, w, b, target, grad, reduction=reduction)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    assert loss.isnan().all() if reduction == "mean" else torch.all(loss == 0)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, **IDENTICAL)


@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
def test_empty_input(reduction):
    h, w, b, target = _inputs(0, 8, 30, torch.float64)
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h.view(0, 0, 8), w, b, target.view(0, 0),
                                  torch.ones(0, 0, dtype=torch.float64) if reduction == "none" else None,
                                  reduction=reduction)
    ref = reference.linear_cross_entropy(h.detach().view(0, 0, 8), w.detach(), target.view(0, 0), b.detach(),
                                         reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert grads[0].shape == (0, 0, 8) and torch.all(grads[1] == 0) and torch.all(grads[2] == 0)


def _bf16_error(fused: bool, h, w, b, target, **options):
    """Max error of loss and each gradient against fp64, running the head under bf16 autocast."""
    fn = AF.linear_cross_entropy if fused else reference.linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(fn, h, w, b, target, **options, **({"chunk_size": 8} if fused else {}))
    ref_loss, ref_grads = _reference(h, w, b, target, **options)
    return [(loss.double() - ref_loss).abs().max().item()] + [
        ((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)
    ]


@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, None), (0.1, 3.0)])
def test_bf16_autocast_is_as_accurate_as_eager_autocast(cpu_products, label_smoothing, softcap):
    """Within twice eager autocast's own error against fp64 (one bf16 rounding), for loss and grads."""
    h, w, b, target = _inputs(45, 64, 333, ignored=(1, 2, 40))
    options = {"label_smoothing": label_smoothing, "logit_softcap": softcap}
    ours = _bf16_error(True, h, w, b, target, **options)
    eager = _bf16_error(False, h, w, b, target, **options)
    bf16_unit = torch.finfo(torch.bfloat16).eps
    for name, mine, theirs in zip(("loss", "hidden", "weight", "bias"), ours, eager):
        assert mine <= 2 * theirs + bf16_unit / 8, (name, mine, theirs)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, None), (0.1, 3.0)])
def test_an_fp32_weight_cast_by_vocabulary_slices_under_autocast(cpu_products, monkeypatch, frozen, label_smoothing, softcap):
    """Slices of 7 rows (no divisor of the vocabulary): as accurate as eager autocast against fp64."""
    monkeypatch.setattr(lce, "_SLICE_BYTES", 7 * 4 * 64)
    h, w, b, target = _inputs(45, 64, 333, ignored=(1, 2, 40))
    w.requires_grad_(not frozen)
    options = {"label_smoothing": label_smoothing, "logit_softcap": softcap}
    ours = _bf16_error(True, h, w, b, target, **options)
    eager = _bf16_error(False, h, w, b, target, **options)
    bf16_unit = torch.finfo(torch.bfloat16).eps
    names = ("loss", "hidden", "bias") if frozen else ("loss", "hidden", "weight", "bias")
    for name, mine, theirs in zip(names, ours, eager):
        assert mine <= 2 * theirs + bf16_unit / 8, (name, mine, theirs)


@pytest.mark.parametrize("dtype", list(VS_FP64))
def test_weight_gradient_slices_accumulate_in_place_exactly(cpu_products, monkeypatch, dtype):
    """Several slices per chunk and several chunks: the weight gradient against fp64, in the dtype's rounding."""
    monkeypatch.setattr(lce, "_SLICE_BYTES", 5 * 4 * 24)
    h, w, b, target = _inputs(7, 24, 101, dtype, ignored=(3,))
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, chunk_size=3)
    ref_loss, ref_grads = _reference(h, w, b, target)
    torch.testing.assert_close(loss.double(), ref_loss, **VS_FP64[dtype])
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, **VS_FP64[dtype], msg=name)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The number of elements of every tensor the ops under it return."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_an_fp32_weight_under_autocast_is_never_copied_whole(cpu_products, monkeypatch):
    """The chunk loop (the custom op's body, which dispatch modes do not enter) makes no weight-sized
    tensor but the fp32 weight gradient: no whole bf16 copy of the weight, no 16-bit partial product."""
    tokens, width, vocab = 32, 16, 512
    monkeypatch.setattr(lce, "_SLICE_BYTES", 64 * 4 * width)
    h = torch.randn(tokens, width, dtype=torch.bfloat16)
    w = torch.randn(vocab, width) / width**0.5
    target = torch.randint(0, vocab, (tokens,))
    with _Allocations() as allocations:
        _, grad_hidden, grad_weight, _ = lce._chunked(h, w, None, target, torch.ones(()), -100, 0.0, 0.0, 8,
                                                      True, True, False)
    assert grad_weight.dtype == torch.float32 and grad_hidden.dtype == torch.bfloat16
    assert sorted(allocations.sizes)[-2:] == [tokens * vocab // 4, vocab * width]  # a chunk's logits, grad_weight


def test_a_bf16_head_outside_autocast_returns_an_fp32_loss_and_bf16_gradients():
    h, w, b, target = _inputs(9, 16, 40, torch.bfloat16)
    loss, grads = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, chunk_size=4)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    ref_loss, _ = _reference(h, w, b, target)
    torch.testing.assert_close(loss.double(), ref_loss, **BF16_LOSS_VS_FP64)


def test_autocast_runs_the_matmuls_in_bf16_and_returns_an_fp32_loss():
    h, w, b, target = _inputs(9, 16, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AF.linear_cross_entropy(h, w, target, b)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32


def test_a_frozen_weight_gets_no_gradient_and_no_weight_gradient_matmul(monkeypatch):
    calls = []
    original = lce._accumulate_weight_grad
    monkeypatch.setattr(lce, "_accumulate_weight_grad", lambda *args: (calls.append(1), original(*args)))
    h, w, b, target = _inputs(13, 16, 37)
    w.requires_grad_(False)
    _loss, (grad_hidden, grad_bias) = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, chunk_size=4)
    assert calls == [] and w.grad is None
    _ref_loss, (ref_hidden, ref_bias) = _reference(h, w, b, target)
    torch.testing.assert_close(grad_hidden.double(), ref_hidden, **VS_FP64[torch.float32])
    torch.testing.assert_close(grad_bias.double(), ref_bias, **VS_FP64[torch.float32])
    w.requires_grad_(True)
    _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, chunk_size=4)
    assert len(calls) == 4  # one per chunk when the weight trains


def test_tied_embedding_weight_accumulates_both_gradients():
    vocab, width = 50, 16
    embedding = torch.nn.Embedding(vocab, width, dtype=torch.float64)
    ids = torch.randint(0, vocab, (3, 7))
    target = torch.randint(0, vocab, (3, 7))

    def grads(loss_fn):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(ids))
        loss_fn(hidden, embedding.weight, target).backward()
        return embedding.weight.grad.clone()

    fused = grads(lambda h, w, t: AF.linear_cross_entropy(h, w, t, chunk_size=5))
    torch.testing.assert_close(fused, grads(reference.linear_cross_entropy), **SUMMATION_ORDER_FP64)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_gives_the_eager_loss_and_gradients(reduction):
    torch._dynamo.reset()
    h, w, b, target = _inputs(13, 16, 37, ignored=(2,))

    def step(h, w, b, target):
        loss = AF.linear_cross_entropy(h, w, target, b, reduction=reduction, label_smoothing=0.1, chunk_size=4)
        return loss.sum()

    eager = _loss_and_grads(lambda h, w, t, b: step(h, w, b, t), h, w, b, target)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled = _loss_and_grads(lambda h, w, t, b: compiled_step(h, w, b, t), h, w, b, target)
    torch.testing.assert_close(compiled[0], eager[0], **IDENTICAL)
    for ours, theirs in zip(compiled[1], eager[1]):
        torch.testing.assert_close(ours, theirs, **IDENTICAL)


@pytest.mark.parametrize("frozen", [True, False])
def test_nothing_of_tokens_by_vocab_is_saved(frozen):
    tokens, width, vocab = 64, 16, 4096
    h, w, _b, target = _inputs(tokens, width, vocab, bias=False)
    w.requires_grad_(not frozen)
    with SavedTensorCounter(exclude=[w]) as fused:
        loss = AF.linear_cross_entropy(h, w, target, chunk_size=16)
    with SavedTensorCounter(exclude=[w]) as eager:
        reference.linear_cross_entropy(h, w, target)
    logits_bytes = tokens * vocab * 4
    # The hidden gradient (tokens x hidden, fp32) and, when the weight trains, its gradient.
    expected = tokens * width * 4 + (0 if frozen else vocab * width * 4)
    assert fused.stats.activation_bytes == expected < logits_bytes <= eager.stats.activation_bytes
    loss.backward()


def test_reduction_none_saves_only_hidden_and_targets():
    h, w, _b, target = _inputs(64, 16, 4096, bias=False)
    with SavedTensorCounter(exclude=[w]) as counter:
        AF.linear_cross_entropy(h, w, target, reduction="none", chunk_size=16)
    assert counter.stats.activation_bytes == h.numel() * 4 + target.numel() * 8


def test_default_chunk_rule():
    assert lce.default_chunk_size(4096, 128256) == 256
    assert lce.default_chunk_size(4096, 32000) * 32000 * 4 <= lce.CHUNK_LOGITS_BYTES
    assert lce.default_chunk_size(3, 128256) == 3
    assert lce.default_chunk_size(4096, 128256, weight_trains=True) == lce.MIN_WEIGHT_GRAD_CHUNK
    assert lce.default_chunk_size(100, 128256, weight_trains=True) == 100
    assert lce.default_chunk_size(0, 10) == 1
    assert lce.default_chunk_size(10**6, 10**9) == 1


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"target": torch.zeros(4, 3)}, TypeError, "class indices"),
        ({"target": torch.zeros(5, dtype=torch.long)}, ValueError, "target must have hidden's shape"),
        ({"weight": torch.randn(10, 7)}, ValueError, "weight must be"),
        ({"bias": torch.randn(9)}, ValueError, "bias must be"),
        ({"weight": torch.randn(10, 8, dtype=torch.float64)}, TypeError, "torch.autocast"),
        ({"reduction": "avg"}, ValueError, "reduction='avg'"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"target": torch.full((4, 3), 10)}, ValueError, r"outside \[0, 10\)"),
        ({"hidden": torch.zeros(4, 3, 8, dtype=torch.long)}, TypeError, "hidden must be"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(change, error, match):
    arguments = {"hidden": torch.randn(4, 3, 8), "weight": torch.randn(10, 8), "target": torch.zeros(4, 3, dtype=torch.long)}
    arguments.update(change)
    with pytest.raises(error, match=match):
        AF.linear_cross_entropy(**arguments)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, None), (0.1, 3.0)])
def test_triton_path_matches_the_reference(dtype, reduction, label_smoothing, softcap):
    """The Triton step against the fp64 reference (fp32), and against the PyTorch path (bf16: the
    interpreter truncates to bf16 where the GPU rounds, see tests.tolerances.TRITON_VS_TORCH)."""
    h, w, b, target = _inputs(11, 16, 4100 + 3, dtype, ignored=range(4, 8), device=TRITON_DEVICE)
    grad = torch.randn(11, dtype=dtype, device=TRITON_DEVICE) if reduction == "none" else None
    options = {"reduction": reduction, "label_smoothing": label_smoothing, "logit_softcap": softcap, "chunk_size": 4}
    results = {}
    for backend in ("triton", "torch"):
        with use_backend(backend):
            results[backend] = _loss_and_grads(AF.linear_cross_entropy, h, w, b, target, grad, **options)
    if dtype == torch.float32:
        options.pop("chunk_size")
        expected = _reference(h, w, b, target, None if grad is None else grad.double(), **options)
        expected = (expected[0].to(dtype), [g.to(dtype) for g in expected[1]])
        tolerance = VS_FP64[dtype]
    else:
        expected, tolerance = results["torch"], TRITON_VS_TORCH_LINEAR_CROSS_ENTROPY_BF16
    loss, grads = results["triton"]
    torch.testing.assert_close(loss, expected[0], **tolerance)
    for name, ours, theirs in zip(("hidden", "weight", "bias"), grads, expected[1]):
        torch.testing.assert_close(ours, theirs, **tolerance, msg=name)
