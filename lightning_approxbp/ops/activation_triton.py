"""The activations and their exact derivatives as Triton device functions.

``ACTIVATION`` is the registry's ``kernel_id`` (:mod:`lightning_approxbp.activations`). A registry
entry without a branch here fails to compile, so the ahead-of-time compile check catches it.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals read inside a kernel must be constexpr: the compiler refuses plain Python floats
# (the interpreter accepts them, so only the ahead-of-time compile check catches this). They
# stand right of a tensor in every product: the interpreter cannot multiply constexpr * tensor.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_QUICK_GELU_ALPHA = tl.constexpr(1.702)


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """The exact forward of a registry activation, in the precision of ``x``, with the
    registry's limits at infinity."""
    if ACTIVATION == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))
    elif ACTIVATION == 1:
        inner = (x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI
        y = 0.5 * x * (1.0 + (2.0 * sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 2:
        y = x * sigmoid(x)
    elif ACTIVATION == 3:
        y = x * sigmoid(x * _QUICK_GELU_ALPHA)
    else:
        tl.static_assert(False, "an activation of the registry has no branch in the Triton kernels")
    # The registry's values at infinity (+inf -> +inf, -inf -> 0), where x * cdf(x) gives NaN.
    y = tl.where(x == float("inf"), x, tl.where(x == -float("inf"), 0.0, y))
    return y


@triton.jit
def activation_derivative(x, ACTIVATION: tl.constexpr):
    """The exact derivative h'(x) of a registry activation."""
    if ACTIVATION == 0:
        d = 0.5 * (1.0 + tl.erf(x * _SQRT_HALF)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACTIVATION == 1:
        t = 2.0 * sigmoid((x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI * 2.0) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (1.0 + x * x * _TANH_CUBIC * 3.0) * _SQRT_2_OVER_PI
    elif ACTIVATION == 2:
        s = sigmoid(x)
        d = s + x * s * (1.0 - s)
    elif ACTIVATION == 3:
        s = sigmoid(x * _QUICK_GELU_ALPHA)
        d = s + x * s * (1.0 - s) * _QUICK_GELU_ALPHA
    else:
        tl.static_assert(False, "an activation of the registry has no branch in the Triton kernels")
    return d
