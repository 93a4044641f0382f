"""Mixture-of-experts blocks whose experts are gated MLPs: found by probing, fused, exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_approxbp import convert
from lightning_approxbp.conversion.gated_experts import FusedGatedExperts, detect_gated_experts
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import EXACT_GRADS_MAX_RELATIVE_FP32, LOSS_FP32

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _moe(config_name: str, model_name: str, **extra: object) -> nn.Module:
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).train()


MODELS = {
    "mixtral": lambda: _moe("MixtralConfig", "MixtralForCausalLM", num_local_experts=4),
    "qwen2_moe": lambda: _moe(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
    ),
}


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _step(model: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    with SavedTensorCounter(exclude=model.parameters()) as counter:
        loss = model(**_batch()).loss
    loss.backward()
    return counter.stats.activation_bytes, loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(MODELS))
def test_experts_fused_with_exact_gradients_and_fewer_saved_bytes(name: str) -> None:
    """Against the model's own experts (transformers runs them with grouped matmuls, which take no
    fp64): fp32 rounding differences only; a wrong derivative or a swapped gate/up is O(1)."""
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    report = convert(model, _batch(), activations=False, norms=False, dropout=False)
    fused = [row for row in report.rows if row.strategy.startswith("fused gated experts")]
    assert len(fused) == 1 and isinstance(dict(model.named_modules())[fused[0].fqn], FusedGatedExperts)
    assert list(model.state_dict()) == list(reference.state_dict())
    bytes_fused, loss_fused, grads_fused = _step(model)
    bytes_reference, loss_reference, grads_reference = _step(reference)
    # The two runs differ only in how the experts' matmuls are grouped.
    torch.testing.assert_close(loss_fused, loss_reference, **LOSS_FP32)
    relative = ((grads_fused - grads_reference).abs().max() / grads_reference.abs().max()).item()
    assert relative < EXACT_GRADS_MAX_RELATIVE_FP32
    assert bytes_fused < bytes_reference


def test_the_gate_half_is_found_by_probing() -> None:
    """Experts that take the gate from the second half of gate_up_proj are fused the other way round."""
    model = MODELS["mixtral"]()
    experts = model.model.layers[0].mlp.experts
    spec, _ = detect_gated_experts(experts)
    assert spec is not None and spec.gate_first
    with torch.no_grad():  # swapping the halves of the weights is the same as reading the gate second
        halves = experts.gate_up_proj.chunk(2, dim=1)
        experts.gate_up_proj.copy_(torch.cat(halves[::-1], dim=1))
    swapped = _SecondHalfGate(experts)
    spec, _ = detect_gated_experts(swapped)
    assert spec is not None and not spec.gate_first


class _SecondHalfGate(nn.Module):
    """Experts with the gate in the second half of ``gate_up_proj``."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for slot in range(index.shape[1]):
            for token in range(hidden.shape[0]):
                expert = index[token, slot]
                up, gate = (self.gate_up_proj[expert] @ hidden[token]).chunk(2)
                out[token] += weights[token, slot] * (self.down_proj[expert] @ (self.act_fn(gate) * up))
        return out


def test_experts_computing_something_else_are_reported_not_fused() -> None:
    model = MODELS["mixtral"]()
    experts = model.model.layers[0].mlp.experts
    experts.act_fn = nn.ReLU()  # not a registry activation
    report = convert(model, _batch(), activations=False, norms=False, dropout=False)
    row = report.row("model.layers.0.mlp.experts")
    assert row.action == "skipped" and "no single activation" in row.reason
