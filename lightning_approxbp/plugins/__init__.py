"""Lightning plugins: :class:`ApproxBPPrecision`, and the module changes it makes."""

from lightning_approxbp.plugins.module_transforms import (
    recast_trainable_weights,
    store_frozen_weights,
)
from lightning_approxbp.plugins.precision import ApproxBPPrecision

__all__ = ["ApproxBPPrecision", "recast_trainable_weights", "store_frozen_weights"]
