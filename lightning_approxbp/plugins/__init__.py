"""Lightning plugins: :class:`ApproxBPPrecision`."""

from lightning_approxbp.plugins.precision import ApproxBPPrecision, store_frozen_weights

__all__ = ["ApproxBPPrecision", "store_frozen_weights"]
