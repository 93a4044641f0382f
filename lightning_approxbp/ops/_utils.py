"""Glue shared by the ops: input checks, dtypes, small constant tensors, the double-backward guard.

A leaf module: it imports nothing from the package, so kernels and op files can all use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

ACCEPTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_floating(tensor: Tensor, op_name: str, argument: str = "input") -> None:
    if tensor.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"{op_name}: {argument} must be one of {dtype_names(ACCEPTED_DTYPES)}, got {tensor.dtype}.")


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Everything is computed in fp32, except fp64 inputs, which stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` matmuls in hardware (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16
    or AMX-FP16); without it torch emulates them, several times slower than fp32."""
    if dtype in (torch.float32, torch.float64):
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def offset_weight(weight: Tensor, dtype: torch.dtype, offset: float) -> Tensor:
    """A norm's effective scale ``weight + offset`` in ``dtype``; without an offset the weight
    itself (no copy, no pass): callers only read it."""
    return weight.to(dtype) + offset if offset else weight.to(dtype)


# Device types torch.autocast knows; asking about another (e.g. "meta") raises.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu", "privateuseone"})


def autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast computes in for ``tensor``'s device, or ``None`` when autocast is off there."""
    device_type = tensor.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(tensor: Tensor) -> AbstractContextManager[object]:
    """Autocast switched off for ``tensor``'s device (nothing to switch off on e.g. "meta")."""
    device_type = tensor.device.type
    return torch.autocast(device_type, enabled=False) if device_type in _AUTOCAST_DEVICE_TYPES else nullcontext()


def packed_size(numel: int, bits: int) -> int:
    """Bytes that hold ``numel`` codes of ``bits`` bits each."""
    return math.ceil(numel * bits / 8)


@lru_cache(maxsize=64)
def table_tensor(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor, built once per device (tables are immutable)."""
    return torch.tensor(values, dtype=dtype, device=device)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def in_plain_eager_mode() -> bool:
    """Not compiling, and no function or dispatch mode (counters, tracers, fake tensors) active."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


def is_plain_tensor(tensor: Tensor) -> bool:
    """A tensor with memory behind it: not a subclass (fake, DTensor) and not on the meta device."""
    return type(tensor) in _PLAIN_TENSOR_TYPES and tensor.device.type != "meta"


def call_op(op: Callable[..., Any], implementation: Callable[..., Any], *args: Any) -> Any:
    """Call the ``torch.library`` custom ``op``, or, in plain eager mode, its ``implementation``.

    The custom op is what torch.compile, fake and meta tensors, tensor subclasses (e.g. DTensor)
    and active function or dispatch modes (counters, tracers) must see. On plain tensors in eager
    mode both give the same result, and the dispatcher's round trip costs ~30 us per call: about a
    tenth of a small model's CPU step, where a dozen ops run per block.
    """
    if not in_plain_eager_mode():
        return op(*args)
    for arg in args:
        if isinstance(arg, torch.Tensor) and not is_plain_tensor(arg):
            return op(*args)
    return implementation(*args)


def requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on ``tensor`` that ties it to ``upstream`` and refuses to be differentiated."""

    @staticmethod
    def forward(ctx, tensor: Tensor, upstream: Tensor, op_name: str) -> Tensor:  # type: ignore[override]
        ctx.op_name = op_name
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        raise RuntimeError(
            f"{ctx.op_name} does not support double backward (its backward is not differentiable). "
            "Use the original torch module where second derivatives are needed."
        )


def guard_double_backward(
    grads: tuple[Tensor | None, ...], upstream: Tensor, op_name: str
) -> tuple[Tensor | None, ...]:
    """Under ``create_graph=True``, make any attempt to differentiate ``grads`` raise clearly.

    The op's backward runs without building a graph; the guard connects its results to the
    graph so that a second differentiation reaches the explanation instead of failing with a
    generic "does not require grad".
    """
    if not torch.is_grad_enabled():
        return grads
    # With a constant incoming gradient nothing would require grad; a throwaway leaf makes
    # the result part of the graph so that differentiating it reaches the explanation.
    anchor = upstream if upstream.requires_grad else torch.zeros((), requires_grad=True)
    return tuple(None if g is None else _RaiseOnBackward.apply(g, anchor, op_name) for g in grads)
