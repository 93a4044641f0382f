"""Ops: Triton kernels (CUDA) and PyTorch paths (everywhere) behind one dispatch point.

- ``ops.step_activation`` and ``ops.ms_norm``: the PyTorch path, the ``torch.library`` custom
  ops (namespace ``approxbp``, so ``torch.compile`` captures each as one opaque node) and the
  autograd Function; their Triton kernels and launchers sit beside them in ``*_triton.py``.
- ``ops.linear_cross_entropy``: the LM head and its cross-entropy, chunked over tokens so that
  the ``tokens x vocab`` logits never exist; its per-chunk Triton kernel is in
  ``linear_cross_entropy_triton.py``.
- ``ops.dispatch``: the one rule that picks Triton or PyTorch for an input.
- ``ops.affine_linear``: a norm's affine applied inside the consuming linear layer; an
  autograd Function over torch's matmuls (no kernel of its own), traceable by ``torch.compile``.
- ``ops.aot_compile``: compiles every launchable kernel for real GPUs without one.
- ``ops.reference``: fp64 formulas the tests check everything against (no library code uses it).

The user-facing functions live in :mod:`lightning_approxbp.functional`.
"""

from lightning_approxbp.ops._utils import packed_size
from lightning_approxbp.ops.dispatch import BACKENDS, triton_available, use_backend
from lightning_approxbp.ops.ms_norm import MSNormFunction
from lightning_approxbp.ops.step_activation import StepActivationFunction

__all__ = [
    "BACKENDS",
    "MSNormFunction",
    "StepActivationFunction",
    "packed_size",
    "triton_available",
    "use_backend",
]
