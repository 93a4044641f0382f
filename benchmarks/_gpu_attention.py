"""Count attention the way a GPU runs it: what flash / memory-efficient attention keeps for backward.

On CPU, ``scaled_dot_product_attention`` with dropout takes the math path, which saves the
``s x s`` probabilities and the dropout mask (60 of BERT-base's 98 bytes per token per d at 256
tokens). On a GPU, the flash and memory-efficient kernels keep only ``q``, ``k``, ``v``, the
output and an fp32 log-sum-exp per query row (plus a 16-byte RNG seed/offset for dropout) and
recompute the rest in backward, with or without dropout.

``register()`` adds an attention implementation, ``approxbp_gpu_view``, to transformers'
registries that computes exactly what ``sdpa`` computes (same output, same dropout draws) and saves
exactly that set: the given ``q``, ``k``, ``v`` (cast to the autocast dtype under autocast, as
the autocast-listed op does; un-repeated for grouped-query attention, as flash kernels take them), the output in the ``batch x seq x heads x dim`` layout that the output
projection then reads (so the two share one storage, as on a GPU), and an fp32 ``batch x heads x
seq`` tensor standing for the log-sum-exp. Its backward recomputes ``sdpa`` from ``q``, ``k``, ``v``
under the forward's RNG state, so training with it is correct too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NAME = "approxbp_gpu_view"


class _RecomputedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, call: Any) -> Tensor:  # type: ignore[override]
        ctx.call = call
        ctx.rng_state = torch.get_rng_state()
        with torch.no_grad():
            output = call(query, key, value)
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        query, key, value, _, _ = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng_state)
            output = ctx.call(*inputs)
        needs = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(output, needs, grad_output) if needs else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)


def _attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)[0]

    device = query.device.type
    if torch.is_autocast_enabled(device):
        # sdpa is on autocast's lower-precision list: the kernel gets (and saves) the casts.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _RecomputedAttention.apply(query, key, value, call), None


def register() -> None:
    """Make ``config._attn_implementation = NAME`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
