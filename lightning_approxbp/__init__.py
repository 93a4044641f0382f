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

from lightning_approxbp import functional, nn, tables
from lightning_approxbp.callbacks import ApproxBP, PeakMemoryMonitor
from lightning_approxbp.conversion import ConversionReport, convert
from lightning_approxbp.ops import use_backend
from lightning_approxbp.plugins import ApproxBPPrecision

__version__ = "0.1.0"

__all__ = [
    "ApproxBP",
    "ApproxBPPrecision",
    "ConversionReport",
    "PeakMemoryMonitor",
    "__version__",
    "convert",
    "functional",
    "nn",
    "tables",
    "use_backend",
]
