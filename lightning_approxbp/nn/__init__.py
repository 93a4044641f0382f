"""Modules: thin wrappers over :mod:`lightning_approxbp.functional`, and the replacements a
conversion puts in place (each built by its ``from_module`` classmethod)."""

from lightning_approxbp.nn.activation import ReGELU2, ReSiLU2, StepActivation
from lightning_approxbp.nn.dropout import RegeneratedDropout
from lightning_approxbp.nn.gated_experts import FusedGatedExperts
from lightning_approxbp.nn.gated_mlp import FusedGatedMLP
from lightning_approxbp.nn.lm_head import FusedLMHead
from lightning_approxbp.nn.norm import (
    ConvertedLayerNorm,
    ConvertedNorm,
    ConvertedRMSNorm,
    MSLayerNorm,
    MSRMSNorm,
)
from lightning_approxbp.nn.shared_input import AffineMergedLinear, SharedInputLinear

__all__ = [
    "AffineMergedLinear",
    "ConvertedLayerNorm",
    "ConvertedNorm",
    "ConvertedRMSNorm",
    "FusedGatedExperts",
    "FusedGatedMLP",
    "FusedLMHead",
    "MSLayerNorm",
    "MSRMSNorm",
    "ReGELU2",
    "ReSiLU2",
    "RegeneratedDropout",
    "SharedInputLinear",
    "StepActivation",
]
