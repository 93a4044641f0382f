"""Liger-Kernel's LLaMA-family blocks, counted on a machine without a GPU.

``apply_liger_kernel_to_{llama,mistral,qwen2}(model=...)`` swaps in Liger's ``LigerRMSNorm`` and
``LigerSwiGLUMLP``; their autograd Functions (``LigerRMSNormFunction``, ``LigerSiLUMulFunction``)
decide what is saved for backward. Liger's Triton kernels do not run under Triton's CPU
interpreter (liger-kernel 0.8.5: ``InterpreterError: 'float' object has no attribute 'to'`` in
``_rms_norm_forward_kernel`` and the SwiGLU kernel), so :func:`cpu_kernels` replaces only the
kernel launchers (``rms_norm_forward``, ``swiglu_forward``) by the same math in PyTorch,
returning tensors of the same shapes and dtypes. Liger's own Functions and modules run
unchanged, so the saved set is Liger's: ``X``, ``W``, ``RSTD`` (fp32, one per row) for the norm,
``a`` and ``b`` for the gate product. Forward only: that is all a count needs (on a GPU the one GPU
command runs the real kernels).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

import torch
from torch import Tensor, nn

_APPLY = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral", "qwen2": "apply_liger_kernel_to_qwen2"}


def available() -> str | None:
    """The installed liger-kernel version, or ``None``."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return None
    return version("liger-kernel")


def _rms_norm_forward(X: Tensor, W: Tensor | None, eps: float, offset: float, casting_mode, row_mode):
    # Liger's "llama" casting mode: only the inverse RMS in fp32, output in X's dtype.
    shape = X.shape
    rows = X.view(-1, shape[-1])
    rstd = torch.rsqrt(rows.float().pow(2).mean(-1) + eps)
    y = (rows.float() * rstd[:, None]).to(X.dtype)
    if W is not None:
        y = y * (W + offset).to(X.dtype)
    return y.view(*shape), rows, rstd, None, None, casting_mode


def _swiglu_forward(a: Tensor, b: Tensor, gate_multiplier: float = 1.0):
    shape = a.shape
    a, b = a.view(-1, shape[-1]), b.view(-1, shape[-1])
    c = (torch.nn.functional.silu(a.float() * gate_multiplier) * b.float()).to(a.dtype)
    return a, b, c.view(*shape)


@contextmanager
def cpu_kernels() -> Iterator[None]:
    """Run Liger's Functions with PyTorch launchers in place of the Triton ones (see module doc)."""
    from liger_kernel.ops import rms_norm, swiglu

    saved = rms_norm.rms_norm_forward, swiglu.swiglu_forward
    rms_norm.rms_norm_forward, swiglu.swiglu_forward = _rms_norm_forward, _swiglu_forward
    try:
        yield
    finally:
        rms_norm.rms_norm_forward, swiglu.swiglu_forward = saved


def apply(model: nn.Module, family: str) -> None:
    """Liger's RMSNorm and SwiGLU on ``model`` (rope and the loss kernels left out: they do not
    change what a block saves)."""
    import liger_kernel.transformers as liger

    getattr(liger, _APPLY[family])(
        rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, model=model
    )
