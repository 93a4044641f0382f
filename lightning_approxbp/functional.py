"""Functional API: Approx-BP activations, memory-sharing norms and the fused linear + cross-entropy.

Example::

    >>> import torch
    >>> from lightning_approxbp import functional as AF
    >>> x = torch.randn(8, 64, requires_grad=True)
    >>> y = AF.step_activation(x, "gelu", bits=2)      # exact GELU forward, 2-bit backward
    >>> torch.allclose(y, torch.nn.functional.gelu(x))
    True
    >>> h = AF.ms_layer_norm(x, 64)                      # saves its output, not its input
    >>> (y.sum() + h.sum()).backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_approxbp.ops.linear_cross_entropy import linear_cross_entropy
from lightning_approxbp.ops.ms_norm import DEFAULT_WEIGHT_CLAMP, ms_norm
from lightning_approxbp.ops.step_activation import step_activation as _step_activation
from lightning_approxbp.tables import StepTable, get_table

__all__ = [
    "linear_cross_entropy",
    "ms_layer_norm",
    "ms_rms_norm",
    "regelu2",
    "resilu2",
    "resolve_table",
    "step_activation",
]


def resolve_table(activation: str, bits: int, table: StepTable | str) -> StepTable:
    """Turn ``table`` (a :class:`StepTable` or a shipped kind name) into a table for ``activation``."""
    if isinstance(table, StepTable):
        if table.activation != activation or table.bits != bits:
            raise ValueError(
                f"The table is for {table.activation!r} with {table.bits} bits, but activation={activation!r} "
                f"and bits={bits} were requested. Pass matching values or omit them."
            )
        return table
    return get_table(activation, bits, kind=table)


def step_activation(x: Tensor, activation: str = "gelu", *, bits: int = 2, table: StepTable | str = "fitted") -> Tensor:
    """Exact ``activation`` forward; backward multiplies by a ``bits``-bit step derivative.

    Args:
        x: floating-point input of any shape.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        bits: 1, 2 or 4 bits saved per element.
        table: ``"fitted"`` (default), ``"paper"``, or a :class:`~lightning_approxbp.tables.StepTable`.

    Non-finite inputs: the forward gives the activation's limits at infinity (``+inf`` at
    ``+inf``, ``0`` at ``-inf``; NaN stays NaN), on both backends and every CPU. Exact backprop
    gives a NaN gradient at a NaN or infinite input; here any non-finite input of a call makes
    that call's whole input gradient NaN (the codes cannot say which element it was), so
    divergence still shows and fp16 loss scaling still skips the step.
    """
    return _step_activation(x, resolve_table(activation, bits, table))


def regelu2(x: Tensor) -> Tensor:
    """GELU forward with the paper's 2-bit ReGELU2 derivative."""
    return _step_activation(x, get_table("gelu", 2, kind="paper"))


def resilu2(x: Tensor) -> Tensor:
    """SiLU forward with the paper's 2-bit ReSiLU2 derivative."""
    return _step_activation(x, get_table("silu", 2, kind="paper"))


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def ms_layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    output_dtype: torch.dtype | None = None,
    weight_clamp: float = DEFAULT_WEIGHT_CLAMP,
) -> Tensor:
    """LayerNorm that saves its output (and one fp32 rstd per row) instead of its input.

    Args:
        x: input whose trailing dimensions equal ``normalized_shape``.
        normalized_shape: as in :func:`torch.nn.functional.layer_norm`.
        weight, bias: optional affine parameters. Without them the backward is exact; with
            them the normalised value is recovered from the output (see :mod:`.ops.ms_norm`).
        eps: added to the variance.
        output_dtype: dtype of the result. Default: the autocast dtype when autocast is on
            (so the next linear layer saves the same tensor), else the input dtype.
        weight_clamp: smallest ``|weight|`` used as a divisor when recovering the input.
    """
    return ms_norm(
        x,
        _as_shape(normalized_shape),
        weight,
        bias,
        eps=eps,
        centered=True,
        output_dtype=output_dtype,
        weight_clamp=weight_clamp,
    )


def ms_rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    output_dtype: torch.dtype | None = None,
    weight_clamp: float = DEFAULT_WEIGHT_CLAMP,
) -> Tensor:
    """RMSNorm that saves its output (and one fp32 rstd per row) instead of its input.

    ``offset`` adds a constant to the weight, e.g. ``offset=1.0`` for Gemma's ``(1 + w)``.
    Other arguments as in :func:`ms_layer_norm`.
    """
    return ms_norm(
        x,
        _as_shape(normalized_shape),
        weight,
        None,
        eps=eps,
        centered=False,
        offset=offset,
        output_dtype=output_dtype,
        weight_clamp=weight_clamp,
    )
