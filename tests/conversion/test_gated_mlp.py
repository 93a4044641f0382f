"""Gated MLPs are found by structure and probing, fused exactly, and reported when they cannot be."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_approxbp import convert
from lightning_approxbp.conversion.gated_mlp import FusedGatedMLP, detect_gated_mlp
from tests.conversion.models import CASES
from tests.tolerances import IDENTICAL, ROUNDING


class RenamedSwiGLU(nn.Module):
    """Mixtral-style names (w1 gate, w3 up, w2 down) and the activation as a function attribute."""

    def __init__(self, dim: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.act = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class ThreeLinearsNotGated(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.act(self.a(x) + self.b(x)))


def test_roles_come_from_probing_not_names():
    spec, reason = detect_gated_mlp(RenamedSwiGLU())
    assert reason is None and (spec.gate, spec.up, spec.down, spec.activation) == ("w1", "w3", "w2", "silu")
    assert spec.activation_child is None


def test_three_linears_that_compute_something_else_are_not_a_gated_mlp():
    assert detect_gated_mlp(ThreeLinearsNotGated()) == (None, None)
    assert detect_gated_mlp(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))) == (None, None)


def test_fused_module_keeps_the_state_dict_and_the_output():
    model = nn.Sequential(nn.LayerNorm(16), RenamedSwiGLU())
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    report = convert(model, x)
    assert isinstance(model[1], FusedGatedMLP) and report.row("1").strategy == "fused gated MLP (silu)"
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), reference(x), **ROUNDING[torch.float32])
    assert "fused gated MLP" in repr(model)
    again = convert(model, x)  # idempotent
    assert again.row("1").action == "unchanged" and not again.converted


def test_fusing_saves_the_product_and_activation_of_every_llama_mlp():
    case = CASES["llama"]
    fused = convert(case.build(), case.batch)
    unfused = convert(case.build(), case.batch, gated_mlp=False)
    assert fused.bytes_after < unfused.bytes_after < unfused.bytes_before


def test_a_lora_wrapped_down_projection_is_reported_not_fused():
    peft = pytest.importorskip("peft")
    base = CASES["llama"].build()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["down_proj"], lora_dropout=0.0))
    report = convert(model, CASES["llama"].batch)
    row = report.row("base_model.model.model.layers.0.mlp")
    assert row.action == "skipped" and "down projection is a peft.tuners.lora" in row.reason
    # its activation is then converted on its own, as without fusion
    assert report.row("base_model.model.model.layers.0.mlp.act_fn").action == "converted"


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_pytorch_path_is_eager_bit_for_bit(autocast: bool):
    """The fused LLaMA MLP on the PyTorch path: eager's output and every gradient, with no tolerance
    (its elementwise ops are eager's own, rounded where eager rounds)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    eager = nn.Sequential(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=88)))
    fused = copy.deepcopy(eager)
    x = torch.randn(2, 7, 32)
    convert(fused, x)
    assert isinstance(fused[0], FusedGatedMLP)
    grad = torch.randn(2, 7, 32)
    results = []
    for model in (eager, fused):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs)
        results.append((out, *torch.autograd.grad(out, (inputs, *model.parameters()), grad.to(out.dtype))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **IDENTICAL)
