"""Module changes that let the ApproxBP layers pay off under reduced precision.

Used by :class:`~lightning_approxbp.plugins.ApproxBPPrecision`; each is also usable alone and
each can be undone (see the functions).
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from lightning_approxbp.nn import MSLayerNorm, MSRMSNorm
from lightning_approxbp.nn.shared_input import SHARED_INPUT_TYPES
from lightning_approxbp.ops._utils import autocast_dtype
from lightning_approxbp.ops.affine_linear import affine_linear

# Modules whose forward rounds the weight to the autocast dtype at every call: one autocast-listed
# op (linear, addmm, convNd), or the ApproxBP merged linears (which cast to the autocast dtype
# themselves). Exact types only: a subclass may use its weight differently.
_AUTOCAST_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *SHARED_INPUT_TYPES)
_AUTOCAST_MODULE_NAMES = frozenset({"transformers.pytorch_utils.Conv1D"})

def store_frozen_weights(module: nn.Module, dtype: torch.dtype) -> dict[nn.Parameter, torch.dtype]:
    """Store the frozen weights of autocast-cast layers in ``dtype``, in place.

    A parameter is converted only when it does not require grad, is floating point and wider
    than ``dtype``, and every module that holds it is an exact ``nn.Linear``/``nn.ConvNd``,
    transformers ``Conv1D`` or ApproxBP merged linear (a weight tied to an embedding is left
    alone). Parameter objects are kept, so references (optimizers, tied modules) stay valid.
    Sharded (``DTensor``) parameters are left alone: FSDP2 all-gathers from buffers whose dtype
    it fixed at ``fully_shard`` (its ``MixedPrecisionPolicy(param_dtype=...)`` is the way to
    gather them in half precision).

    Returns:
        The converted parameters and their original dtypes.

    Example::

        >>> layer = torch.nn.Linear(4, 4).requires_grad_(False)
        >>> converted = store_frozen_weights(layer, torch.bfloat16)
        >>> layer.weight.dtype, len(converted)
        (torch.bfloat16, 2)
    """
    owners: dict[nn.Parameter, list[nn.Module]] = {}
    for submodule in module.modules():
        for param in submodule.parameters(recurse=False):
            owners.setdefault(param, []).append(submodule)
    converted: dict[nn.Parameter, torch.dtype] = {}
    for param, holders in owners.items():
        if param.requires_grad or not param.is_floating_point() or isinstance(param, DTensor):
            continue
        if torch.finfo(param.dtype).bits <= torch.finfo(dtype).bits:
            continue
        if all(_is_autocast_cast(holder) for holder in holders):
            converted[param] = param.dtype
            param.data = param.data.to(dtype)
    return converted


def recast_trainable_weights(module: nn.Module) -> list[nn.Linear]:
    """Make exact ``nn.Linear`` layers with a trainable weight cast it again in backward under autocast.

    The layer's ``forward`` is replaced on the instance (class, parameters and state dict are
    unchanged; ``del layer.forward`` undoes it). Outside autocast, or without grad, the layer
    runs ``F.linear`` as before.

    Returns:
        The layers changed by this call (already changed layers are skipped).

    Example::

        >>> layer = torch.nn.Linear(4, 4)
        >>> len(recast_trainable_weights(layer))
        1
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     layer(torch.randn(2, 4)).dtype
        torch.bfloat16
    """
    changed = []
    for submodule in module.modules():
        if type(submodule) is nn.Linear and submodule.weight.requires_grad and "forward" not in submodule.__dict__:
            submodule.forward = MethodType(_linear_recasting_in_backward, submodule)
            changed.append(submodule)
    return changed


def _linear_recasting_in_backward(self: nn.Linear, x: Tensor) -> Tensor:
    weight = self.weight
    # A DTensor weight here is tensor-parallel (FSDP2 gathers plain tensors before forward): its
    # sharded matmul belongs to DTensor's own linear.
    if not (autocast_dtype(x) is not None and torch.is_grad_enabled() and weight.requires_grad) or isinstance(
        weight, DTensor
    ):
        return F.linear(x, weight, self.bias)
    # The affine-merged linear with no affine: saves the input in the autocast dtype and a
    # reference to the fp32 weight, casts the weight again in backward, and runs the matmuls
    # autograd runs for autocast's linear (bit-identical results).
    return affine_linear(x, None, None, weight, self.bias)


def _is_autocast_cast(module: nn.Module) -> bool:
    cls = type(module)
    return cls in _AUTOCAST_MODULE_TYPES or f"{cls.__module__}.{cls.__qualname__}" in _AUTOCAST_MODULE_NAMES


def follow_input_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Under ``*-true``, make memory-sharing norms with a wider explicit ``output_dtype`` emit their input's dtype."""
    for submodule in module.modules():
        if isinstance(submodule, (MSLayerNorm, MSRMSNorm)) and submodule.output_dtype not in (None, dtype):
            submodule.output_dtype = None
