"""Ops: Triton kernels (CUDA) and PyTorch paths (everywhere) behind one dispatch point.

Every op is registered with ``torch.library`` (namespace ``approxbp``) so that
``torch.compile`` captures it as one opaque node. The user-facing functions live in
:mod:`lightning_approxbp.functional`; each op's module (``ops.step_activation``,
``ops.ms_norm``, ``ops.affine_linear``) holds its kernels' launch, PyTorch path and Function.
"""

from lightning_approxbp.ops._utils import BACKENDS, triton_available, use_backend
from lightning_approxbp.ops.ms_norm import MSNormFunction
from lightning_approxbp.ops.step_activation import StepActivationFunction, packed_size

__all__ = [
    "BACKENDS",
    "MSNormFunction",
    "StepActivationFunction",
    "packed_size",
    "triton_available",
    "use_backend",
]
