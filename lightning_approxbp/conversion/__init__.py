"""Model conversion: find activations and norms, swap in the memory-saving ones, report.

- :func:`convert` (in :mod:`.engine`): the public verb; changes a model in place and returns a
  :class:`ConversionReport`.
- :mod:`.activations`, :mod:`.norms`: recognise candidates by behaviour / structure.
- :mod:`.consumers`: trace where each norm output goes during a probe forward.
- :mod:`.merged`: consumer layers that apply a norm's affine (the compute-time merge).
- :mod:`.walker`: find and swap modules, with undo.
"""

from lightning_approxbp.conversion.config import AFFINE_STRATEGIES, ConversionConfig
from lightning_approxbp.conversion.engine import convert
from lightning_approxbp.conversion.report import ConversionReport, ReportRow

__all__ = ["AFFINE_STRATEGIES", "ConversionConfig", "ConversionReport", "ReportRow", "convert"]
