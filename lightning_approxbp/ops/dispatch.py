"""The one place that chooses between the Triton kernels and the PyTorch path.

Every op's ``torch.library`` implementation asks :func:`dispatch` for the function to run on
its input: the Triton launcher (imported on first use, so that Triton stays optional) or the
op's PyTorch path. Both save the same tensors for backward.

The rule: under ``"auto"`` (default), CUDA tensors in fp32/fp16/bf16 run Triton and everything
else runs PyTorch. ``use_backend("triton" | "torch")`` or the ``APPROXBP_BACKEND`` environment
variable forces one; a forced Triton that cannot run says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import dtype_names

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "APPROXBP_BACKEND"
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

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
    """``"triton"`` or ``"torch"`` for ``tensor``; explains why a forced Triton cannot run."""
    choice = selected_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        usable = tensor.is_cuda and triton_available() and tensor.dtype in TRITON_DTYPES
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError(f"{op_name}: the Triton backend was requested but Triton is not installed.")
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreter_enabled())):
        raise RuntimeError(
            f"{op_name}: Triton kernels need CUDA tensors (got {tensor.device}). "
            "Set TRITON_INTERPRET=1 before importing to run them on CPU, or use the 'torch' backend."
        )
    if tensor.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{op_name}: the Triton kernels support {dtype_names(TRITON_DTYPES)}, got {tensor.dtype}. "
            "float64 runs on the 'torch' backend."
        )
    return "triton"


def dispatch(op_name: str, tensor: Tensor, torch_path: Callable[..., Any], triton_launcher: str) -> Callable[..., Any]:
    """The function that runs ``op_name`` on ``tensor``.

    Args:
        op_name: the op, for error messages.
        tensor: the input that decides (device and dtype).
        torch_path: the op's PyTorch implementation.
        triton_launcher: ``"module:function"`` of the Triton launcher with the same signature.
    """
    if resolve_backend(tensor, op_name) == "torch":
        return torch_path
    module, _, function = triton_launcher.partition(":")
    return getattr(importlib.import_module(module), function)
