"""lightning-approxbp: approximate and memory-sharing backpropagation for PyTorch Lightning.

- :mod:`lightning_approxbp.functional` and :mod:`lightning_approxbp.nn`: Approx-BP activations
  (exact forward, k-bit step derivative) and memory-sharing LayerNorm/RMSNorm.
- :mod:`lightning_approxbp.tables`: the step tables and the solver that fits them.
"""

from lightning_approxbp import functional, nn, tables
from lightning_approxbp.ops import use_backend

__version__ = "0.1.0"

from lightning_approxbp.conversion import ConversionReport, convert  # noqa: E402
from lightning_approxbp.callbacks import ApproxBP  # noqa: E402

__all__ = ["__version__", "functional", "nn", "tables", "use_backend", "ApproxBP", "ConversionReport", "convert"]
