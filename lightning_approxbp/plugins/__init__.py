"""Lightning plugins: :class:`ApproxBPPrecision`."""

from lightning_approxbp.plugins.precision import ApproxBPPrecision, recast_trainable_weights, store_frozen_weights

__all__ = ["ApproxBPPrecision", "recast_trainable_weights", "store_frozen_weights"]
