"""Tiny real transformers models for the convergence tests: random init, fixed data, no downloads.

Every model is built from a small config (hidden 32, 2 layers, sequence 16, batch 4) with
dropout off, so that two runs from the same seed differ only by what the conversion changes.
The training data is four fixed synthetic batches, cycled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, HIDDEN, N_BATCHES = 128, 16, 4, 32, 4
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_DECODER = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}


@dataclass(frozen=True)
class Model:
    """How to build one model and its data.

    ``activation``: the activation the default conversion approximates (its step table), or
    ``None`` when the model has none outside a gated MLP (those are fused and stay exact).
    """

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, Tensor]]
    activation: str | None


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER))


def _mixtral() -> nn.Module:
    config = transformers.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=2, **_NO_DROPOUT,
    )
    return transformers.BertForSequenceClassification(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, **_NO_DROPOUT,
    )
    return transformers.ViTForImageClassification(config)


def _lm_batch(generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}


def _classification_batch(generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (BATCH,), generator=generator)}


def _image_batch(generator: torch.Generator) -> dict[str, Tensor]:
    pixels = torch.randn(BATCH, 3, 16, 16, generator=generator)
    return {"pixel_values": pixels, "labels": torch.randint(0, 3, (BATCH,), generator=generator)}


MODELS: dict[str, Model] = {
    "llama": Model(_llama, _lm_batch, None),
    "gpt2": Model(_gpt2, _lm_batch, "gelu_tanh"),
    "bert": Model(_bert, _classification_batch, "gelu"),
    "vit": Model(_vit, _image_batch, "gelu"),
    "mixtral": Model(_mixtral, _lm_batch, None),
}


def batches(name: str) -> list[dict[str, Tensor]]:
    """The fixed training batches of model ``name``."""
    generator = torch.Generator().manual_seed(1)
    return [MODELS[name].batch(generator) for _ in range(N_BATCHES)]
