"""Recognise activations by what they compute, not by their class name.

A candidate (a parameter-free leaf module, or a torch function stored as a module attribute,
like ``nn.TransformerEncoderLayer.activation``) is run on a probe tensor that spans negative,
small and large values. It is converted when exactly reproducing one of the exact forwards that
:class:`~lightning_approxbp.nn.StepActivation` implements; ReLU, clipped or unknown
activations match none and are left alone.

Example::

    >>> from torch import nn
    >>> identify_activation(nn.GELU(approximate="tanh"))
    'gelu_tanh'
    >>> identify_activation(nn.ReLU()) is None
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor, nn

from lightning_approxbp.activations import ACTIVATIONS, get_activation

# Modules of these packages are reported when left alone, so that the report names them.
ACTIVATION_MODULE_PACKAGES: tuple[str, ...] = ("torch.nn.modules.activation", "transformers.activations")
_RTOL = 1e-5
_ATOL = 1e-5


@cache
def _probe_tensor() -> Tensor:
    values = torch.cat([torch.linspace(-20.0, 20.0, 801), torch.linspace(-1.0, 1.0, 201)])
    return values.view(1, -1)


def identify_activation(candidate: Callable[[Tensor], Tensor]) -> str | None:
    """The activation name whose exact forward ``candidate`` reproduces in fp32, else ``None``."""
    x = _probe_tensor()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = candidate(x.clone())
    except Exception:  # noqa: BLE001 - anything that cannot run on a plain tensor is not an activation
        return None
    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        return None
    for name in ACTIVATIONS:
        if torch.allclose(out, get_activation(name).torch_forward(x), rtol=_RTOL, atol=_ATOL):
            return name
    return None


def is_activation_candidate(module: nn.Module) -> bool:
    """A leaf module without parameters or buffers: cheap and side-effect free to probe."""
    return (
        next(module.children(), None) is None
        and next(module.parameters(recurse=False), None) is None
        and next(module.buffers(recurse=False), None) is None
    )


def looks_like_activation(module: nn.Module) -> bool:
    """Whether the module's class comes from a known activation package (reported if skipped)."""
    return type(module).__module__ in ACTIVATION_MODULE_PACKAGES


def function_attributes(module: nn.Module) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """Torch functions stored as plain attributes (e.g. ``TransformerEncoderLayer.activation``)."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(value) or inspect.isbuiltin(value)):
            continue
        if getattr(value, "__module__", None) in ("torch.nn.functional", "torch._C._nn", "torch"):
            found.append((name, value))
    return found
