"""Lightning callbacks: :class:`ApproxBP` (conversion) and :class:`PeakMemoryMonitor` (logging)."""

from lightning_approxbp.callbacks.approxbp import ApproxBP
from lightning_approxbp.callbacks.peak_memory import PeakMemoryMonitor

__all__ = ["ApproxBP", "PeakMemoryMonitor"]
