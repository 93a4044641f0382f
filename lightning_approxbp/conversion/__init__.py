"""Model conversion: find what each technique can change, swap in the memory-saving modules, report.

- :func:`convert` (in :mod:`.engine`): the public verb; changes a model in place and returns a
  :class:`ConversionReport`. The engine runs ``engine.RULES``, one rule per technique
  (:mod:`.rule` says what a rule does).
- One file per technique, with its recognition, its rule and its config part:
  :mod:`.activations`, :mod:`.norms` (with the consumer layers of :mod:`.merged`),
  :mod:`.gated_mlp`, :mod:`.gated_experts`, :mod:`.dropout`; and :mod:`.fused_loss`, which runs
  after verification.
- :class:`ConversionConfig` (in :mod:`.config`): the options, composed of those parts, and the
  presets (``ConversionConfig.preset("paper")``).
- :mod:`.consumers`: trace where each norm output goes during a probe forward.
- :mod:`.walker`: find and swap modules, with undo.
"""

from lightning_approxbp.conversion.config import (
    AFFINE_STRATEGIES,
    PRESETS,
    ConversionConfig,
)
from lightning_approxbp.conversion.engine import convert
from lightning_approxbp.conversion.report import ConversionReport, ReportRow

__all__ = ["AFFINE_STRATEGIES", "PRESETS", "ConversionConfig", "ConversionReport", "ReportRow", "convert"]
