"""Saved-tensor offload of chosen blocks to host memory, without changing the module tree or state-dict keys.

An offloaded block keeps its class, children and parameters; only its instance gets a
``forward`` attribute that runs the class's forward under
:func:`torch.autograd.graph.saved_tensors_hooks`: each tensor the block saves for backward is
copied to host memory in the forward (pinned, with a non-blocking copy, when it is on CUDA) and
copied back when the backward needs it, so the device copy can be freed in between. Parameters
and buffers are not moved (they stay on the device anyway), nor is anything already on the host:
on a CPU model offload changes nothing. ``del block.forward`` undoes it.

A block is either checkpointed or offloaded, not both: offloading a checkpointed block (or
checkpointing an offloaded one) is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_approxbp.memory.checkpointing import wrap_forwards, wrapped_forwards
from lightning_approxbp.saved_tensors import storage_id

HOST = torch.device("cpu")
# In the simulation the model's (fake) device stands for the accelerator and the meta device for host
# memory: MemTracker counts storages per device, so the offloaded copies drop out of the device's peak.
SIMULATED_HOST = torch.device("meta")

Packed = Tensor | tuple[torch.device, Tensor, bool]


class OffloadedForward:
    """A block's forward whose saved tensors live on ``host`` between forward and backward.

    Attributes:
        moved_bytes: bytes copied to the host so far (each comes back once in backward).

    Example::

        >>> block = nn.Linear(4, 4)
        >>> block.forward = OffloadedForward(block, host=SIMULATED_HOST)
        >>> list(block.state_dict())
        ['weight', 'bias']
    """

    def __init__(self, module: nn.Module, host: torch.device = HOST) -> None:
        self.forward = module.forward
        self.module = module
        self.host = host
        self.moved_bytes = 0
        self._resident: set[int] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        # read at each call: moving the model to the accelerator replaces the parameters' storages
        self._resident = {storage_id(t) for t in (*self.module.parameters(), *self.module.buffers())}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, unpack):
            return self.forward(*args, **kwargs)

    def pack(self, tensor: Tensor) -> Packed:
        if tensor.device == self.host or storage_id(tensor) in self._resident:
            return tensor
        pin = tensor.is_cuda and self.host.type == "cpu"  # pinned memory lets the copy run asynchronously
        copy = torch.empty(tensor.size(), dtype=tensor.dtype, device=self.host, pin_memory=pin)
        copy.copy_(tensor, non_blocking=pin)
        self.moved_bytes += copy.numel() * copy.element_size()
        return tensor.device, copy, pin


def unpack(packed: Packed) -> Tensor:
    if isinstance(packed, tuple):
        device, copy, pin = packed
        return copy.to(device, non_blocking=pin)
    return packed


def is_offloaded(module: nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), OffloadedForward)


def offload_blocks(model: nn.Module, names: Iterable[str], host: torch.device = HOST) -> list[OffloadedForward]:
    """Make the named modules of ``model`` keep their saved tensors on ``host``; return their wrappers.

    Raises:
        ValueError: for a name ``model`` does not have, or a module whose ``forward`` is already
            wrapped otherwise (e.g. checkpointed).

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
        >>> (wrapper,) = offload_blocks(model, ["0"])
        >>> _ = model(torch.randn(2, 4, requires_grad=True)).sum().backward()
        >>> is_offloaded(model[0]), wrapper.moved_bytes  # on the CPU the host is the device: nothing moves
        (True, 0)
    """
    modules = wrap_forwards(model, names, OffloadedForward, partial(OffloadedForward, host=host), "offload")
    return [vars(module)["forward"] for module in modules]


@contextmanager
def offloaded_blocks(
    model: nn.Module, names: Iterable[str], host: torch.device = HOST
) -> Iterator[list[OffloadedForward]]:
    """The named modules offloaded inside the block only (yields their wrappers)."""
    with wrapped_forwards(model, names, OffloadedForward, partial(OffloadedForward, host=host), "offload") as modules:
        yield [vars(module)["forward"] for module in modules]
