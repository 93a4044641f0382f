"""What a causal LM's head and loss save for backward, unfused and through the fused loss.

The head is ``lm_head`` (``vocab x hidden``, no bias) on the final norm's output; the loss is the
one transformers computes for ``model(input_ids, labels=...)``:

- ``unfused``: ``F.linear`` then transformers' ``ForCausalLMLoss`` (logits upcast to fp32,
  labels shifted by one, ``-100`` ignored), the model's own code path;
- ``fused``: :func:`lightning_approxbp.conversion.fused_loss.causal_lm_loss`, which a conversion
  with ``fused_loss`` routes the same call through.

Counted like the blocks (saved-tensor hooks, once per storage, the weight itself excluded), on
fake tensors: shapes and dtypes are exact and nothing is allocated, so the true vocabularies cost
no memory or time. Weight-sized storages (an autocast copy of the weight; the fused path's fp32
weight gradient, computed in the forward) are counted apart: they do not grow with the tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_approxbp.conversion.fused_loss import causal_lm_loss
from lightning_approxbp.saved_tensors import storage_id

PATHS: tuple[str, ...] = ("unfused", "fused")
HEADS: tuple[str, ...] = ("frozen", "trainable")  # LoRA / adapters; full fine-tuning


class _HeadSaves:
    """Saved storages of one head + loss forward, split into per-token and weight-sized bytes."""

    def __init__(self, weight: Tensor) -> None:
        self.weight_storage = storage_id(weight)
        self.weight_numel = weight.numel()
        self.seen: set[int] = set()
        self.per_token = self.weight_sized = 0

    def pack(self, tensor: Tensor) -> Tensor:
        key = storage_id(tensor)
        if key not in self.seen and key != self.weight_storage:
            self.seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            if nbytes == self.weight_numel * tensor.element_size():
                self.weight_sized += nbytes
            else:
                self.per_token += nbytes
        return tensor.detach()


def measure_head(hidden_size: int, vocab: int, tokens: int, precision: str, path: str, head: str) -> dict[str, Any]:
    """One head + loss forward on ``tokens`` tokens (one sequence) in ``precision``; bytes saved."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    with FakeTensorMode():
        hidden = torch.empty(1, tokens, hidden_size, dtype=dtype, requires_grad=True)
        weight = torch.empty(vocab, hidden_size, dtype=dtype, requires_grad=head == "trainable")
        labels = torch.zeros(1, tokens, dtype=torch.long)
        saves = _HeadSaves(weight)
        with torch.autograd.graph.saved_tensors_hooks(saves.pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            if path == "fused":
                causal_lm_loss(hidden, weight, None, labels)
            else:
                ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=vocab)
    return {"precision": precision, "head": head, "path": path, "vocab": vocab, "hidden": hidden_size,
            "tokens": tokens, "bytes_per_token": saves.per_token / tokens, "weight_sized_bytes": saves.weight_sized}
