"""See the activations a module's ``forward`` calls as functions (``F.gelu(x)``), during the probe.

Such a call cannot be converted: a conversion swaps modules and function attributes, not lines
of someone's ``forward``. The reference probe runs under :func:`watch_activation_calls` so that
the report can list each one as left exact, with the reason, instead of saying nothing. The
watch is a :class:`~torch.overrides.TorchFunctionMode` that compares each called function with a
few objects (no tensor is read) and forward hooks that keep the stack of running modules, so it
costs little next to the probe itself. Only torch functions are seen: an activation written out
by hand (``x * torch.sigmoid(x)``) is a product of other ops.

Example::

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def forward(self, x):
    ...         return F.gelu(x)
    >>> block = Block()
    >>> with watch_activation_calls(block) as calls:
    ...     _ = block(torch.randn(2, 4))
    >>> [(type(module).__name__, name) for module, name in calls]
    [('Block', 'gelu')]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _gelu_name(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


# The torch functions of the registry's activations, each with the registry name of a call.
_ACTIVATION_FUNCTIONS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], str]] = {
    F.gelu: _gelu_name,
    F.silu: lambda args, kwargs: "silu",
}



def function_form(name: str) -> tuple[str, str]:
    """For a registry name a call can give: the function called, and the module that would convert it."""
    if name.startswith("gelu"):
        return "F.gelu", "nn.GELU(approximate='tanh')" if name.endswith("tanh") else "nn.GELU()"
    return "F.silu", "nn.SiLU()"

# (the innermost module running, registry name), each pair once, in call order
ActivationCalls = dict[tuple[nn.Module, str], None]


class _Watch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[nn.Module] = []
        self.calls: ActivationCalls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = _ACTIVATION_FUNCTIONS.get(func)
        if name is not None and self.stack:
            self.calls.setdefault((self.stack[-1], name(args, kwargs)), None)
        return func(*args, **kwargs)


@contextmanager
def watch_activation_calls(root: nn.Module) -> Iterator[ActivationCalls]:
    """Context manager: yields the activation calls made inside ``root``'s modules while it is open."""
    watch = _Watch()

    def push(module: nn.Module, args: Any) -> None:
        watch.stack.append(module)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        watch.stack.pop()

    handles = []
    for module in root.modules():
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        with watch:
            yield watch.calls
    finally:
        for handle in handles:
            handle.remove()
