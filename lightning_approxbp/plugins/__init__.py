"""Lightning plugins: :class:`ApproxBPPrecision` (a subclass per precision family) and the module changes it makes."""

from lightning_approxbp.plugins.module_transforms import (
    recast_trainable_weights,
    store_frozen_weights,
)
from lightning_approxbp.plugins.precision import (
    ApproxBPDoublePrecision,
    ApproxBPHalfPrecision,
    ApproxBPMixedPrecision,
    ApproxBPPrecision,
    ApproxBPSinglePrecision,
)

__all__ = [
    "ApproxBPDoublePrecision",
    "ApproxBPHalfPrecision",
    "ApproxBPMixedPrecision",
    "ApproxBPPrecision",
    "ApproxBPSinglePrecision",
    "recast_trainable_weights",
    "store_frozen_weights",
]
