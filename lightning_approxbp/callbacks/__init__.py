"""Lightning callbacks."""

from lightning_approxbp.callbacks.approxbp import ApproxBP

__all__ = ["ApproxBP"]
