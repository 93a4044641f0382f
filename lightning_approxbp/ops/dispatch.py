"""The one place that chooses between the Triton kernels, the native CPU kernels and the PyTorch path.

Every op's ``torch.library`` implementation asks :func:`dispatch` for the function to run on
its input: the Triton launcher (imported on first use, so that Triton stays optional), the
native CPU launcher where the op has one, or the op's PyTorch path. All save the same tensors
for backward.

The rule: under ``"auto"`` (default), CUDA tensors in fp32/fp16/bf16 run Triton, CPU tensors in
those dtypes run the native CPU kernels where the op has them and they could be built, and
everything else runs PyTorch. ``use_backend("triton" | "native" | "torch")`` or the
``APPROXBP_BACKEND`` environment variable forces one; a forced backend that cannot run says why.
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

from lightning_approxbp.ops._utils import dtype_names, in_plain_eager_mode, is_plain_tensor
from lightning_approxbp.ops.native_cpu import NATIVE_DTYPES, library, native_available

BACKENDS: tuple[str, ...] = ("auto", "triton", "native", "torch")
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
    """Force the kernels used inside the block: ``"triton"``, ``"native"``, ``"torch"`` or ``"auto"``.

    ``"auto"`` (the default, also settable with the ``APPROXBP_BACKEND`` environment variable)
    runs Triton kernels on CUDA tensors, the native CPU kernels on CPU tensors of the ops that
    have them, and the PyTorch path everywhere else. ``"native"`` runs the native kernels where
    an op has them for the tensor (fp32/fp16/bf16 on CPU) and PyTorch elsewhere, and raises
    :class:`~lightning_approxbp.ops.native_cpu.NativeUnavailable` with the reason when they
    cannot be built; ``"torch"`` runs PyTorch only. All save the same tensors for backward.

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


def _resolve_native(tensor: Tensor, forced: bool) -> str:
    # The kernels read and write memory: fake, meta and subclass tensors (memory simulation,
    # tracing, DTensor), active modes and compilation take the PyTorch path, which they can all run.
    if not (in_plain_eager_mode() and is_plain_tensor(tensor)):
        return "torch"
    if tensor.device.type != "cpu" or tensor.dtype not in NATIVE_DTYPES:
        return "torch"
    if not native_available():
        if forced:
            library()  # raises NativeUnavailable with the reason
        return "torch"
    return "native"


def resolve_backend(tensor: Tensor, op_name: str, has_triton: bool = True, has_native: bool = False) -> str:
    """``"triton"``, ``"native"`` or ``"torch"`` for ``tensor``; explains why a forced backend cannot run.

    ``has_triton`` / ``has_native``: whether the op has Triton / native CPU kernels; an op
    without the selected kind runs its PyTorch path.
    """
    choice = selected_backend()
    if choice == "torch" or (choice == "triton" and not has_triton):
        return "torch"
    if choice == "native":
        return _resolve_native(tensor, forced=True) if has_native else "torch"
    if choice == "auto":
        if tensor.is_cuda:
            usable = has_triton and triton_available() and tensor.dtype in TRITON_DTYPES
            return "triton" if usable else "torch"
        return _resolve_native(tensor, forced=False) if has_native else "torch"
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


def dispatch(
    op_name: str,
    tensor: Tensor,
    torch_path: Callable[..., Any],
    triton_launcher: str | None = None,
    native_launcher: str | None = None,
) -> Callable[..., Any]:
    """The function that runs ``op_name`` on ``tensor``.

    Args:
        op_name: the op, for error messages.
        tensor: the input that decides (device and dtype).
        torch_path: the op's PyTorch implementation.
        triton_launcher: ``"module:function"`` of the Triton launcher with the same signature,
            for ops that have one.
        native_launcher: ``"module:function"`` of the native CPU launcher with the same
            signature, for ops that have one.
    """
    backend = resolve_backend(tensor, op_name, triton_launcher is not None, native_launcher is not None)
    launcher = triton_launcher if backend == "triton" else native_launcher if backend == "native" else None
    return torch_path if launcher is None else _load_launcher(launcher)


@cache
def _load_launcher(launcher: str) -> Callable[..., Any]:
    """The function named ``"module:function"``, imported on first use."""
    module, _, function = launcher.partition(":")
    return getattr(importlib.import_module(module), function)
