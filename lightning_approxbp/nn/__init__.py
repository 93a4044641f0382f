"""Modules: thin wrappers over :mod:`lightning_approxbp.functional`."""

from lightning_approxbp.nn.activation import ReGELU2, ReSiLU2, StepActivation
from lightning_approxbp.nn.dropout import RegeneratedDropout
from lightning_approxbp.nn.norm import MSLayerNorm, MSRMSNorm

__all__ = ["MSLayerNorm", "MSRMSNorm", "ReGELU2", "ReSiLU2", "RegeneratedDropout", "StepActivation"]
