"""lightning-approxbp: approximate and memory-sharing backpropagation for PyTorch Lightning.

Layers, from the bottom up:

- :mod:`lightning_approxbp.ops`: Triton kernels and PyTorch paths, registered with torch.library;
- :mod:`lightning_approxbp.tables`: step tables for the Approx-BP derivative and their solver;
- :mod:`lightning_approxbp.functional`, :mod:`lightning_approxbp.nn`: step-derivative
  activations and memory-sharing LayerNorm/RMSNorm;
- :func:`convert`: turns a model into a lower-memory one in place and reports what changed;
- :class:`ApproxBP`, :class:`PeakMemoryMonitor`, :class:`ApproxBPPrecision`: Lightning integration.

Example::

    from lightning.pytorch import Trainer
    from lightning_approxbp import ApproxBP

    Trainer(callbacks=[ApproxBP()]).fit(model, datamodule=datamodule)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_approxbp import functional, nn, tables
from lightning_approxbp.conversion import ConversionConfig, ConversionReport, convert
from lightning_approxbp.errors import OptionError, ProbeError
from lightning_approxbp.ops import use_backend

if TYPE_CHECKING:
    from lightning_approxbp.callbacks import ApproxBP, PeakMemoryMonitor
    from lightning_approxbp.plugins import ApproxBPPrecision

__version__ = "0.1.0"

# The Lightning layer loads on first use, so that `convert` and everything below it work with
# torch alone (Lightning is a dependency of the package, not of the conversion).
_LIGHTNING_EXPORTS = {
    "ApproxBP": "lightning_approxbp.callbacks",
    "PeakMemoryMonitor": "lightning_approxbp.callbacks",
    "ApproxBPPrecision": "lightning_approxbp.plugins",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_EXPORTS:
        return getattr(importlib.import_module(_LIGHTNING_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ApproxBP",
    "ApproxBPPrecision",
    "ConversionConfig",
    "ConversionReport",
    "OptionError",
    "ProbeError",
    "PeakMemoryMonitor",
    "__version__",
    "convert",
    "functional",
    "nn",
    "tables",
    "use_backend",
]
