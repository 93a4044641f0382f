"""Lightning plugins: :class:`ApproxBPPrecision` (a subclass per precision family) and the module changes it makes."""

from lightning_approxbp.plugins.module_transforms import (
    recast_trainable_weights,
    store_frozen_weights,
)
from lightning_approxbp.plugins.precision import (
    ApproxBPDoublePrecision,
    ApproxBPFSDPPrecision,
    ApproxBPHalfPrecision,
    ApproxBPMixedPrecision,
    ApproxBPPrecision,
    ApproxBPSinglePrecision,
    choose_precision,
)

__all__ = [
    "ApproxBPDoublePrecision",
    "ApproxBPFSDPPrecision",
    "ApproxBPHalfPrecision",
    "ApproxBPMixedPrecision",
    "ApproxBPPrecision",
    "ApproxBPSinglePrecision",
    "choose_precision",
    "recast_trainable_weights",
    "store_frozen_weights",
]
