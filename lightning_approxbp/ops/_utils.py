"""Glue shared by the ops: backend choice, input checks, launch settings."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "APPROXBP_BACKEND"
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
ACCEPTED_DTYPES: tuple[torch.dtype, ...] = (*TRITON_DTYPES, torch.float64)

# A module global, not a ContextVar: autograd runs CUDA backward passes on its own threads,
# which would not see a context variable set by the training loop.
_backend_override: str | None = None


@cache
def triton_available() -> bool:
    """Whether Triton is importable (it is not on macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _validate_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; expected one of {BACKENDS}.")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the kernels used inside the block: ``"triton"``, ``"torch"`` or ``"auto"``.

    ``"auto"`` (the default, also settable with the ``APPROXBP_BACKEND`` environment variable)
    runs Triton kernels on CUDA tensors and the PyTorch path everywhere else. Both save the
    same tensors for backward.

    Example::

        >>> import torch
        >>> from lightning_approxbp.functional import regelu2
        >>> with use_backend("torch"):
        ...     y = regelu2(torch.randn(4, requires_grad=True))
    """
    global _backend_override
    previous = _backend_override
    _backend_override = _validate_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def selected_backend() -> str:
    if _backend_override is not None:
        return _backend_override
    return _validate_backend(os.environ.get(BACKEND_ENV_VAR, "auto"))


def resolve_backend(tensor: Tensor, op_name: str) -> str:
    """Pick ``"triton"`` or ``"torch"`` for ``tensor``; explain why a forced choice cannot run."""
    choice = selected_backend()
    if choice == "torch":
        return "torch"
    runnable_device = tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreter_enabled())
    if choice == "auto":
        usable = tensor.is_cuda and triton_available() and tensor.dtype in TRITON_DTYPES
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError(f"{op_name}: the Triton backend was requested but Triton is not installed.")
    if not runnable_device:
        raise RuntimeError(
            f"{op_name}: Triton kernels need CUDA tensors (got {tensor.device}). "
            "Set TRITON_INTERPRET=1 before importing to run them on CPU, or use the 'torch' backend."
        )
    if tensor.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{op_name}: the Triton kernels support {_names(TRITON_DTYPES)}, got {tensor.dtype}. "
            "float64 runs on the 'torch' backend."
        )
    return "triton"


def check_floating(tensor: Tensor, op_name: str, argument: str = "input") -> None:
    if tensor.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"{op_name}: {argument} must be one of {_names(ACCEPTED_DTYPES)}, got {tensor.dtype}.")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Everything is computed in fp32, except fp64 inputs, which stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
