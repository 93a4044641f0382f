"""Tiny models shared by the memory tests: transformers BERT and LLaMA at toy width, random init."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 97


def tiny_bert(layers: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=32, intermediate_size=128, num_attention_heads=2, vocab_size=VOCAB,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(config).train()
    batch = {"input_ids": torch.randint(0, VOCAB, (4, 16)), "labels": torch.randint(0, 2, (4,))}
    return model, batch


def tiny_llama(layers: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=32, intermediate_size=88, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, attn_implementation="eager",
        use_cache=False,  # a KV cache would grow again in the recompute of a checkpointed layer
    )
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    return model, {"input_ids": ids, "labels": ids}


def loss_and_grads(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One seeded forward and backward (same dropout masks each call): the loss and every gradient."""
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
