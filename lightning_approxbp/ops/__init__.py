"""Ops: Triton kernels (CUDA) and PyTorch paths (everywhere) behind one dispatch point.

Every op is registered with ``torch.library`` (namespace ``approxbp``) so that
``torch.compile`` captures it as one opaque node.
"""

from lightning_approxbp.ops._utils import BACKENDS, triton_available, use_backend
from lightning_approxbp.ops.ms_norm import MSNormFunction, ms_norm
from lightning_approxbp.ops.step_activation import StepActivationFunction, packed_size, step_activation

__all__ = [
    "BACKENDS",
    "MSNormFunction",
    "StepActivationFunction",
    "ms_norm",
    "packed_size",
    "step_activation",
    "triton_available",
    "use_backend",
]
