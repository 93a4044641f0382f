"""Norms are recognised by structure, verified numerically, and keep their parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_approxbp.conversion.norms import build_converted_norm, detect_norm
from tests.tolerances import ROUNDING

modeling = pytest.importorskip("transformers.models")


def _norms() -> list[tuple[nn.Module, bool, float]]:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [
        (nn.LayerNorm(16), True, 0.0),
        (nn.LayerNorm(16, bias=False), True, 0.0),
        (nn.LayerNorm(16, elementwise_affine=False), True, 0.0),
        (nn.RMSNorm(16, eps=1e-6), False, 0.0),
        (nn.RMSNorm(16), False, 0.0),  # eps=None: the input dtype's machine epsilon
        (LlamaRMSNorm(16), False, 0.0),
        (MistralRMSNorm(16), False, 0.0),
        (Qwen2RMSNorm(16), False, 0.0),
        (T5LayerNorm(16), False, 0.0),
        (GemmaRMSNorm(16), False, 1.0),
    ]


@pytest.mark.parametrize("index", range(10))
@pytest.mark.parametrize("strategy", ["keep", "merge"])
def test_detected_and_converted(index: int, strategy: str) -> None:
    module, centered, offset = _norms()[index]
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    spec = detect_norm(module)
    assert spec is not None and spec.centered == centered and spec.offset == offset
    converted = build_converted_norm(module, spec, strategy if spec.has_weight else "plain", "input")
    assert list(converted.state_dict()) == list(module.state_dict())
    assert all(a is b for a, b in zip(converted.parameters(), module.parameters(), strict=True))
    x = torch.randn(3, 5, 16)
    expected = module(x)
    if strategy == "merge" and spec.has_weight:  # the affine moves to the consumers
        weight = module.weight + offset
        bias = module.bias if getattr(module, "bias", None) is not None else 0.0
        torch.testing.assert_close(converted(x) * weight + bias, expected)
    else:
        torch.testing.assert_close(converted(x), expected)
    assert "approxbp" in repr(converted)


@pytest.mark.parametrize(
    "module",
    [nn.GroupNorm(1, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.LayerNorm((4, 16)).eval()],
    ids=["groupnorm", "batchnorm", "linear", "layernorm-2d"],
)
def test_not_a_convertible_norm(module: nn.Module) -> None:
    spec = detect_norm(module)
    if isinstance(module, nn.LayerNorm):  # a 2-D LayerNorm converts but can never merge
        assert spec is not None and spec.normalized_shape == (4, 16)
    else:
        assert spec is None


def test_torch_rmsnorm_with_default_eps_converts_in_a_model_and_follows_the_input_dtype() -> None:
    from lightning_approxbp import convert

    model = nn.Sequential(nn.Linear(8, 64), nn.RMSNorm(64), nn.Linear(64, 8))
    original = copy.deepcopy(model)
    x = torch.randn(4, 8)
    report = convert(model, x)
    assert report.row("1").action == "converted" and "merge" in report.row("1").strategy
    torch.testing.assert_close(model(x), original(x))
    # eps=None is resolved per call from the input dtype, as torch does: fp64 uses fp64's epsilon.
    torch.testing.assert_close(model.double()(x.double()), original.double()(x.double()), **ROUNDING[torch.float64])


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (nn.GroupNorm(2, 16), "normalises over the batch, groups or channels"),
        (nn.BatchNorm1d(16), "normalises over the batch, groups or channels"),
        (nn.LayerNorm(16, eps=1e-5).requires_grad_(False), None),
    ],
)
@pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert")
def test_every_norm_left_alone_is_in_the_report_with_the_reason(module: nn.Module, reason: str | None) -> None:
    from lightning_approxbp import convert

    model = nn.Sequential(nn.Linear(16, 16), module, nn.Linear(16, 16))
    report = convert(model, torch.randn(4, 16))
    row = report.row("1")
    if reason is None:
        assert row.action == "converted"
    else:
        assert row.action == "skipped" and reason in row.reason


class _ScaledNorm(nn.Module):
    """Looks like a norm (a weight and an eps) but computes something else: must be reported."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight / (x.abs().max(dim=-1, keepdim=True).values + self.eps)


@pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert")
def test_a_norm_like_module_that_matches_no_form_is_reported() -> None:
    from lightning_approxbp import convert

    model = nn.Sequential(nn.Linear(16, 16), _ScaledNorm(16), nn.Linear(16, 16))
    row = convert(model, torch.randn(4, 16)).row("1")
    assert row.action == "skipped" and "matches none of the forms" in row.reason
