"""Structure first: modules with the same structure get one decision.

A module's *signature* is its class, its plain attributes (numbers, strings, flags, functions;
not its position, such as transformers' ``layer_idx``), the shapes, dtypes and devices of its
own parameters and buffers, and its children's signatures by name. Two modules with the same signature run the same code on tensors of the same layout,
so whatever is recognised by running one of them (an activation, a norm form, a gated MLP's
roles) holds for all: :class:`StructureCache` runs each recognition once per signature, so the
cost of recognition grows with the number of distinct block kinds, not with depth.

Recognition that needs values (it runs the module on a random input) runs on a *twin* when the
module has no values (parameters on the meta device, as models built under
``torch.device("meta")`` or Lightning's ``init_module(empty_init=True)``): a copy materialised on
the CPU with random weights of the same shapes. The module itself is never touched.

Example::

    >>> from torch import nn
    >>> a, b = nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Sequential(nn.Linear(4, 4), nn.GELU())
    >>> signature(a) == signature(b), signature(a) == signature(nn.Sequential(nn.Linear(4, 8), nn.GELU()))
    (True, False)
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

_PLAIN = (int, float, str, bool, type(None))
# nn.Module's own bookkeeping: not part of what the module computes.
_BOOKKEEPING = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
# A block's position in its stack (which cache slot it writes), not what it computes.
_POSITION_SUFFIXES = ("_idx", "_index", "layer_id", "block_id")


def _describes_computation(name: str, value: Any) -> bool:
    if name in _BOOKKEEPING or name.endswith("_hooks") or name.startswith(("_forward", "_backward", "_state_dict", "_load")):
        return False
    return not (isinstance(value, int) and name.endswith(_POSITION_SUFFIXES))


def _attribute_key(value: Any) -> Hashable:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return (getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value)))
    if isinstance(value, torch.dtype):
        return str(value)
    # Other objects (configs, hooks dicts, caches): their kind, not their contents.
    return type(value).__qualname__


def _tensor_key(tensor: Tensor | None) -> Hashable:
    if tensor is None:
        return None
    return (tuple(tensor.shape), str(tensor.dtype), tensor.device.type, tensor.requires_grad)


def signature(module: nn.Module, memo: dict[int, Hashable] | None = None) -> Hashable:
    """The structural signature of ``module`` (see the module docstring); ``memo`` caches by id."""
    memo = {} if memo is None else memo
    key = memo.get(id(module))
    if key is not None:
        return key
    attributes = tuple(
        sorted((name, _attribute_key(value)) for name, value in vars(module).items() if _describes_computation(name, value))
    )
    key = (
        type(module),
        attributes,
        tuple((name, _tensor_key(p)) for name, p in module._parameters.items()),
        tuple((name, _tensor_key(b)) for name, b in module._buffers.items()),
        tuple((name, signature(child, memo) if child is not None else None) for name, child in module._modules.items()),
    )
    memo[id(module)] = key
    return key


def has_no_values(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (has no values)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


# Twins are filled by tiling a random pattern of prime length (from a random offset per tensor):
# memory speed, where drawing every value of a 70B-sized block takes seconds. The prime length
# keeps rows of any width distinct, and the offsets keep tensors of one shape different (a gate
# and an up projection with equal weights could not be told apart).
_PATTERN_LENGTH = 65521


def materialized_twin(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``module`` on the CPU with random values of the same shapes and dtypes.

    Weights are uniform with a ``1/sqrt(fan_in)`` bound, as in a fresh layer; 1-D weights (norm
    scales) in ``[0.5, 1.5]``, so no norm has a scale near zero; other 1-D tensors (biases) zero.
    """
    generator = generator or torch.Generator().manual_seed(0)
    pattern = torch.rand(2 * _PATTERN_LENGTH, generator=generator)
    twin = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in (*twin.named_parameters(), *twin.named_buffers()):
            if not tensor.is_floating_point() or (tensor.dim() <= 1 and not name.endswith("weight")):
                tensor.zero_()
            elif tensor.dim() <= 1:
                _tile(tensor, pattern, generator, 0.5, 1.5)
            else:
                bound = 1.0 / math.sqrt(max(1, tensor[0].numel()))
                _tile(tensor, pattern, generator, -bound, bound)
    return twin


def _tile(tensor: Tensor, pattern: Tensor, generator: torch.Generator, low: float, high: float) -> None:
    start = int(torch.randint(0, _PATTERN_LENGTH, (1,), generator=generator))
    values = (pattern[start:start + _PATTERN_LENGTH] * (high - low) + low).to(tensor.dtype)
    flat, n = tensor.view(-1), tensor.numel()
    full = n // _PATTERN_LENGTH
    if full:
        flat[: full * _PATTERN_LENGTH].view(full, _PATTERN_LENGTH).copy_(values.expand(full, -1))
    flat[full * _PATTERN_LENGTH:].copy_(values[: n - full * _PATTERN_LENGTH])


class StructureCache:
    """Runs each recognition once per (recognition, signature), on a twin where values are needed."""

    def __init__(self) -> None:
        self._signatures: dict[int, Hashable] = {}
        self._results: dict[tuple[str, Hashable], Any] = {}

    def signature(self, module: nn.Module) -> Hashable:
        return signature(module, self._signatures)

    def recognise(self, name: str, module: nn.Module, recognise: Callable[[nn.Module], T]) -> T:
        """``recognise(module)``, or its result for an earlier module of the same signature.

        ``recognise`` reads the structure of the module it is given and calls :meth:`twin` for
        the module to run, so that a twin is only made when values are really needed.
        """
        key = (name, self.signature(module))
        if key not in self._results:
            self._results[key] = recognise(module)
        return self._results[key]

    def twin(self, module: nn.Module) -> nn.Module:
        """``module`` itself when it has values, else a materialised twin.

        Not kept: results are cached per signature, so each twin serves one recognition, and a
        large block's twin is freed before the next one is made.
        """
        return module if not has_no_values(module) else materialized_twin(module)
