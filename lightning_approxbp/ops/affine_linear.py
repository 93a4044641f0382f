"""A linear layer that applies a norm's affine to its input on the fly (compute-time merge).

``affine_linear(x, gamma, beta, weight, bias)`` computes ``linear(x * gamma + beta, weight, bias)``
where ``x`` is the affine-free output of a memory-sharing norm. The affine input
``z = x * gamma + beta`` is a temporary: it is used by the matmul and freed, never saved.

Saved for backward: ``x`` (the very tensor the norm saved, so no extra activation memory) and
the parameters (references, not copies). Recomputed in backward: ``z``, and with
``share_input=True`` also the cast of ``x`` to the compute dtype: a norm that emits fp32 (its
output also feeds the residual stream) saves that fp32 tensor anyway, so a consumer that keeps a
reference to it instead of its own bf16 copy shares the norm's activation. Gradients for ``x``,
``gamma``, ``beta``, ``weight`` and ``bias`` are those of the unmerged computation, so training
dynamics are the original ones and no parameter changes value or name.

Under autocast the computation runs in the autocast dtype, as ``torch.nn.functional.linear``
would; the input is cast first (a no-op when the norm already emitted that dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import (
    autocast_dtype,
    autocast_off,
    compute_dtype,
    guard_double_backward,
    offset_weight,
)

OP_NAME = "affine_linear"


def _affine(x: Tensor, gamma: Tensor | None, beta: Tensor | None, offset: float) -> Tensor:
    """``x * (gamma + offset) + beta`` computed in fp32 (fp64 for fp64) and rounded once to ``x.dtype``.

    The fp32 parameters make the op compute in fp32 with ``x`` widened on the fly, and the
    result is rounded into an ``x.dtype`` output: one pass, no widened copy of ``x``.
    """
    if gamma is None and beta is None:
        return x
    work = compute_dtype(x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if gamma is not None and beta is not None:
        return torch.addcmul(beta.to(work), x, offset_weight(gamma, work, offset), out=out)
    if gamma is not None:
        return torch.mul(x, offset_weight(gamma, work, offset), out=out)
    return torch.add(x, beta.to(work), out=out)


def _matmul(z: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    rows = z.reshape(-1, z.shape[-1])
    w = weight.to(z.dtype)
    w = w if transposed else w.t()
    out = rows @ w if bias is None else torch.addmm(bias.to(z.dtype), rows, w)
    return out.view(*z.shape[:-1], out.shape[-1])


class AffineLinearFunction(torch.autograd.Function):
    """``linear(x * (gamma + offset) + beta, weight, bias)`` that saves only ``x`` and parameters.

    ``transposed=True`` is the layout of transformers' ``Conv1D`` (``weight`` is ``in x out``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        gamma: Tensor | None,
        beta: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        offset: float,
        transposed: bool,
        dtype: torch.dtype,
        share_input: bool,
    ) -> Tensor:
        x_c = x.to(dtype)
        with autocast_off(x):
            out = _matmul(_affine(x_c, gamma, beta, offset), weight, bias, transposed)
        # Only an input in the autograd graph was saved by the norm that made it: sharing a
        # no-grad input (a frozen embedding's norm) would keep the wider tensor for nothing.
        ctx.save_for_backward(x if share_input and x.requires_grad else x_c, gamma, beta, weight, bias)
        ctx.offset, ctx.transposed, ctx.input_dtype, ctx.dtype = offset, transposed, x.dtype, dtype
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        saved_x, gamma, beta, weight, bias = ctx.saved_tensors
        x_c = saved_x.to(ctx.dtype)
        offset, transposed, input_dtype = ctx.offset, ctx.transposed, ctx.input_dtype
        needs_x, needs_gamma, needs_beta, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        n_in = x_c.shape[-1]
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1]).to(x_c.dtype)
        grad_x = grad_gamma = grad_beta = grad_weight = grad_bias = None
        with torch.no_grad():
            if needs_weight:
                z_rows = _affine(x_c, gamma, beta, offset).reshape(-1, n_in)
                grad_w = z_rows.t() @ grad_rows if transposed else grad_rows.t() @ z_rows
                grad_weight = grad_w.to(weight.dtype)
            if needs_bias and bias is not None:
                grad_bias = grad_rows.sum(dim=0).to(bias.dtype)
            if needs_x or needs_gamma or needs_beta:
                w = weight.to(x_c.dtype)
                grad_z = grad_rows @ (w.t() if transposed else w)
                work = compute_dtype(x_c.dtype)
                wide = None
                if (needs_gamma and gamma is not None) or (needs_beta and beta is not None):
                    wide = grad_z.to(work)
                    if needs_gamma and gamma is not None:
                        # A product of fp32 and the 16-bit input (widened on the fly) is exact.
                        grad_gamma = torch.mul(wide, x_c.reshape(-1, n_in)).sum(dim=0).to(gamma.dtype)
                    if needs_beta and beta is not None:
                        grad_beta = wide.sum(dim=0).to(beta.dtype)
                if needs_x:
                    if gamma is None:
                        grad_x = grad_z.to(input_dtype)
                    elif wide is not None and input_dtype == work:
                        # The widened gradient is ours and read no more: scaled in place, it is the
                        # product below bit for bit (widening is exact), without a third buffer.
                        grad_x = wide.mul_(offset_weight(gamma, work, offset))
                    else:
                        # Computed in fp32 (the parameter's dtype), rounded once into the input's dtype.
                        scale = offset_weight(gamma, work, offset)
                        grad_x = torch.mul(grad_z, scale, out=grad_z.new_empty(grad_z.shape, dtype=input_dtype))
                    grad_x = grad_x.view(x_c.shape)
        grads = guard_double_backward((grad_x, grad_gamma, grad_beta, grad_weight, grad_bias), grad_output, OP_NAME)
        return (*grads, None, None, None, None)


def affine_linear(
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    offset: float = 0.0,
    transposed: bool = False,
    share_input: bool = False,
) -> Tensor:
    """Apply a norm's affine ``(gamma + offset, beta)`` and then a linear layer, saving only ``x``.

    Args:
        x: the affine-free norm output, features last.
        gamma, beta: the norm's affine parameters (either or both may be ``None``; with
            neither this is a linear layer that saves its input in the autocast dtype and a
            reference to its weight, not autocast's copy of the weight).
        weight: ``out x in`` (``nn.Linear``) or ``in x out`` with ``transposed=True`` (``Conv1D``).
        bias: the linear layer's bias.
        offset: constant added to ``gamma`` (``1.0`` for Gemma's ``(1 + w)``).
        transposed: ``weight`` is ``in x out`` (transformers ``Conv1D``).
        share_input: save ``x`` itself (a reference) rather than its cast to the autocast dtype,
            and cast again in backward, when ``x`` requires grad. Saves memory when something
            else keeps ``x`` for backward anyway (a memory-sharing norm's output); costs memory
            otherwise.

    Example::

        >>> import torch
        >>> x, g, b = torch.randn(3, 4), torch.randn(4), torch.randn(4)
        >>> w, c = torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(affine_linear(x, g, b, w, c), torch.nn.functional.linear(x * g + b, w, c), atol=1e-6)
        True
    """
    dtype = autocast_dtype(x) or x.dtype
    return AffineLinearFunction.apply(x, gamma, beta, weight, bias, offset, transposed, dtype, share_input)
