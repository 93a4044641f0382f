"""The dropout rule: ``nn.Dropout`` modules become ones that save no full mask.

:class:`~lightning_approxbp.nn.RegeneratedDropout` redraws the same mask from the saved RNG state
in backward on CUDA and keeps it as 1 bit per element on CPU: bit-identical masks and gradients
(see :mod:`lightning_approxbp.ops.dropout`). Exact ``nn.Dropout`` only: subclasses may do more.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_approxbp.conversion.rule import Candidate, ConversionState, Rule
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.nn import RegeneratedDropout


@dataclass(frozen=True)
class DropoutConfig:
    """The dropout rule's option (the same name as in
    :class:`~lightning_approxbp.conversion.config.ConversionConfig`, which documents it)."""

    dropout: bool = True


class DropoutRule(Rule):
    """``nn.Dropout`` with ``p > 0`` becomes :class:`~lightning_approxbp.nn.RegeneratedDropout`."""

    name = "dropout"
    config_type = DropoutConfig
    converted = (RegeneratedDropout,)

    def find(self, site: Site, state: ConversionState) -> bool:
        if not self.options(state).dropout or type(site.module) is not nn.Dropout:
            return False
        if site.module.p > 0 and site.holders:
            state.add(self, Candidate(site))
        return True

    def apply(self, plan: Candidate, state: ConversionState) -> None:
        state.log.replace_site(plan.site, RegeneratedDropout.from_module(plan.site.module))
        state.report.add(plan.site.fqn, "Dropout", "converted", "mask redrawn in backward (CUDA) or kept as bits (CPU)", "saves no full mask; same masks")
