"""Structure-first conversion: one decision per block kind, meta-device models, per-block verification."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_approxbp import convert
from lightning_approxbp.conversion.gated_mlp import FusedGatedMLP
from lightning_approxbp.conversion.structure import StructureCache, materialized_twin, signature
from tests.tolerances import IDENTICAL, SAME_TRAINING_FP32

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _llama_config(layers: int = 2, hidden: int = 32) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )


def _batch(tokens: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, tokens), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def test_decoder_layers_share_one_signature_whatever_their_position() -> None:
    model = transformers.LlamaForCausalLM(_llama_config(layers=3))
    first, *others = (signature(layer) for layer in model.model.layers)
    assert all(other == first for other in others)  # layer_idx differs, what they compute does not


def test_recognition_runs_once_per_block_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_approxbp.conversion import gated_mlp

    calls = []
    original = gated_mlp._reproduces
    monkeypatch.setattr(gated_mlp, "_reproduces", lambda *a: calls.append(1) or original(*a))
    convert(transformers.LlamaForCausalLM(_llama_config(layers=6)), _batch())
    assert 0 < len(calls) <= 2  # gate/up order found once, not per layer


def test_a_meta_model_converts_and_after_loading_real_weights_trains_as_the_real_conversion() -> None:
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(_llama_config())
    state = copy.deepcopy(real.state_dict())
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_llama_config())
    keys = list(meta.state_dict())
    parameters = list(meta.parameters())
    real_report, meta_report = convert(real, _batch()), convert(meta, _batch())
    assert [(r.fqn, r.action, r.strategy) for r in meta_report.rows] == [(r.fqn, r.action, r.strategy) for r in real_report.rows]
    assert all(p.is_meta for p in meta.parameters()) and list(meta.parameters()) == parameters
    assert list(meta.state_dict()) == keys
    # On meta, attention takes torch's math path (it saves its score matrix); what the conversion
    # removes is the same.
    saved = [report.bytes_before - report.bytes_after for report in (real_report, meta_report)]
    assert saved[0] == saved[1] > 0
    meta.to_empty(device="cpu")
    meta.load_state_dict(state)
    meta.model.rotary_emb.inv_freq.copy_(real.model.rotary_emb.inv_freq)  # a non-persistent buffer
    losses = []
    for model in (real, meta):
        model.train()
        loss = model(**_batch()).loss
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(losses[1][0], losses[0][0], **IDENTICAL)
    for a, b in zip(losses[1][1], losses[0][1], strict=True):
        torch.testing.assert_close(a, b, **SAME_TRAINING_FP32)


def test_a_deep_bf16_model_whose_blocks_are_exact_is_not_refused() -> None:
    model = transformers.LlamaForCausalLM(_llama_config(layers=40, hidden=64)).to(torch.bfloat16)
    report = convert(model, _batch())
    assert sum(isinstance(m, FusedGatedMLP) for m in model.modules()) == 40
    assert any("each block kind was verified on its first member" in note for note in report.notes)
    assert report.max_error is not None


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_block_whose_conversion_changes_its_output_is_refused_and_undone(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with torch.device(device):
        model = transformers.LlamaForCausalLM(_llama_config(layers=6))
    before = [type(m) for m in model.modules()]
    forward = FusedGatedMLP.forward
    monkeypatch.setattr(FusedGatedMLP, "forward", lambda self, x: forward(self, x) * 1.01)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0 and the 5 other blocks of its kind"):
        convert(model, _batch())
    assert [type(m) for m in model.modules()] == before


def test_a_twin_has_values_of_the_same_shapes_and_leaves_the_module_alone() -> None:
    with torch.device("meta"):
        block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(8, 16))
    twin = materialized_twin(block)
    assert all(p.is_meta for p in block.parameters()) and not any(p.is_meta for p in twin.parameters())
    assert [p.shape for p in twin.parameters()] == [p.shape for p in block.parameters()]
    assert not torch.equal(twin[1].weight, twin[2].weight)  # two projections can be told apart
    assert twin[0].weight.min() >= 0.5 and torch.all(twin[0].bias == 0)
    assert StructureCache().twin(twin) is twin  # a module with values is used as it is
