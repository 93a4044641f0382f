"""The variants the benchmarks compare, each defined once: what it changes in a model."""

from __future__ import annotations

from typing import Any

from lightning_approxbp.nn import RegeneratedDropout
from torch import nn

# Both techniques as published (Approx-BP activations, MS-BP norms), nothing beyond the paper:
# no fused gated MLPs, no mask-free dropout, no post-LN output sharing.
PAPER_OPTIONS: dict[str, Any] = {"gated_mlp": False, "dropout": False, "share_norm_output": False}

# convert() keyword arguments per conversion variant; an option not named is convert()'s default.
CONVERSIONS: dict[str, dict[str, Any]] = {
    "activations": {"norms": False, **PAPER_OPTIONS},  # Approx-BP alone
    "norms": {"activations": False, **PAPER_OPTIONS},  # MS-BP alone
    "paper": PAPER_OPTIONS,
    "default": {},  # convert() / ApproxBP() as shipped
    # the default with every norm affine kept in the norm and recovered from its output in
    # backward (NVIDIA apex's memory_efficient=True semantics)
    "keep": {"affine": "keep"},
}


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant ``torch.utils.checkpoint`` around every block, through transformers' own switch.

    transformers' switch, not ``lightning_approxbp.memory.checkpointing``: this is the baseline
    users have, and the committed checkpoint figures were measured with it.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def dropout_as_on_cuda(model: nn.Module) -> nn.Module:
    """Converted dropouts redraw their mask in backward, as they do on CUDA (on CPU they keep it as
    1 bit per element): for byte counts that stand for a GPU run."""
    for layer in model.modules():
        if isinstance(layer, RegeneratedDropout):
            layer.mask_storage = "regenerate"
    return model
