"""The activations Approx-BP supports: one registry, read by every layer.

Each entry names an activation and gives what the rest of the package needs of it:

- ``kernel_id``: the value of the Triton kernels' ``ACTIVATION`` switch;
- ``torch_op``: torch's own op (fp32 internally for 16-bit inputs, like torch's fused kernels),
  as it computes at every finite input;
- ``torch_forward``: ``torch_op`` with infinite inputs mapped to the function's limits (below):
  what the PyTorch path and the conversion's behavioural matching compute;
- ``formula``: the same function in elementary operations, exact in any dtype (the fp64
  references of the tests use it);
- ``derivative``: the exact ``h'(x)``, which the step tables approximate;
- ``torch_backward``: ``grad * h'(x)`` as one fused torch kernel (``aten.silu_backward``,
  ``aten.gelu_backward``), or ``None`` where torch has none.

Non-finite inputs have one meaning everywhere (both backends, every CPU): every activation here
tends to ``+inf`` at ``+inf`` and to ``0`` at ``-inf``, and those limits are its values there;
NaN stays NaN. Torch's own kernels do not agree with themselves on this (``x * cdf(x)`` gives
``-inf * 0 = NaN`` at ``-inf``, and on CPUs with AVX512 the vectorised ``F.gelu`` returns NaN at
``+inf`` where its scalar path returns ``+inf``), so the registry fixes it up once.

This module imports nothing from the package, so every layer can read it.

Example::

    >>> import torch
    >>> get_activation("silu").formula(torch.tensor([0.0]))
    tensor([0.])
    >>> ACTIVATIONS
    ('gelu', 'gelu_tanh', 'silu', 'quick_gelu')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_QUICK_GELU_ALPHA = 1.702


@dataclass(frozen=True)
class Activation:
    """One supported activation (see the module docstring for the fields)."""

    name: str
    kernel_id: int
    torch_op: Callable[[Tensor], Tensor]
    formula: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    torch_backward: Callable[[Tensor, Tensor], Tensor] | None = None
    torch_forward: Callable[[Tensor], Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "torch_forward", at_infinity_limits(self.torch_op))


def known_finite(x: Tensor) -> bool:
    """Whether ``x`` is known to hold no infinity and no NaN without a pass that allocates.

    On CPU (outside compilation and fake tensors) one sum answers it: a NaN or an infinity makes
    the sum non-finite (``inf - inf`` is NaN). A sum of finite values that overflows is non-finite
    too, so the answer "unknown" (``False``) can be wrong only on the safe side; the sum is half the
    cost of ``aminmax`` on 16-bit inputs. Elsewhere this says ``False`` (unknown), so callers take
    their unconditional path without a host synchronisation.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return False  # no values to read (compiling, fake tensors): unknown
    if x.numel() == 0:
        return True
    return math.isfinite(x.sum().item())


def limits_at_infinity(x: Tensor, y: Tensor) -> Tensor:
    """``y = op(x)`` with ``+inf`` inputs mapped to ``+inf`` and ``-inf`` inputs to ``0``."""
    return torch.where(x.isinf(), x.clamp(min=0).to(y.dtype), y)


def at_infinity_limits(op: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``op`` with ``+inf`` inputs mapped to ``+inf`` and ``-inf`` inputs to ``0``."""

    def forward(x: Tensor) -> Tensor:
        # On CPU, one reduction that rules out infinities is much cheaper than the select it
        # saves; elsewhere (and while compiling) the select runs, without a data-dependent branch.
        finite = known_finite(x)
        y = op(x)
        return y if finite else limits_at_infinity(x, y)

    forward.__name__ = getattr(op, "__name__", "forward")
    return forward


def _gelu_derivative(x: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_derivative(x: Tensor) -> Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_CUBIC * x**3))
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * _TANH_CUBIC * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner


def _sigmoid_gate_derivative(alpha: float) -> Callable[[Tensor], Tensor]:
    def derivative(x: Tensor) -> Tensor:
        s = torch.sigmoid(alpha * x)
        return s + alpha * x * s * (1.0 - s)

    return derivative


def _quick_gelu(x: Tensor) -> Tensor:
    # torch has no QuickGELU op; compute in fp32 and round once, as its fused kernels do.
    wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (wide * torch.sigmoid(_QUICK_GELU_ALPHA * wide)).to(x.dtype)


_REGISTRY: dict[str, Activation] = {
    entry.name: entry
    for entry in (
        Activation(
            "gelu",
            kernel_id=0,
            torch_op=F.gelu,
            formula=lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
            derivative=_gelu_derivative,
            torch_backward=torch.ops.aten.gelu_backward,
        ),
        Activation(
            "gelu_tanh",
            kernel_id=1,
            torch_op=lambda x: F.gelu(x, approximate="tanh"),
            formula=lambda x: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_CUBIC * x**3))),
            derivative=_gelu_tanh_derivative,
            torch_backward=lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
        ),
        Activation(
            "silu",
            kernel_id=2,
            torch_op=F.silu,
            formula=lambda x: x * torch.sigmoid(x),
            derivative=_sigmoid_gate_derivative(1.0),
            torch_backward=torch.ops.aten.silu_backward,
        ),
        Activation(
            "quick_gelu",
            kernel_id=3,
            torch_op=_quick_gelu,
            formula=lambda x: x * torch.sigmoid(_QUICK_GELU_ALPHA * x),
            derivative=_sigmoid_gate_derivative(_QUICK_GELU_ALPHA),
        ),
    )
}

ACTIVATIONS: tuple[str, ...] = tuple(_REGISTRY)


def get_activation(name: str) -> Activation:
    """The registry entry for ``name``.

    Raises:
        ValueError: for a name that is not registered, listing the ones that are.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.") from None
