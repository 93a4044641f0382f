"""Triton kernel of the per-chunk step of the fused linear + cross-entropy.

One program per row of a chunk's logits (the matmuls around it stay with cuBLAS): a first pass
over the vocabulary in ``BLOCK_SIZE`` slices keeps a running max and sum of exponentials (the
log-sum-exp), the target's logit and the sum of logits (for label smoothing), all in fp32, and
writes the row's loss; a second pass overwrites the logits, in place, with ``scale *
dloss/dlogits`` in the logits' dtype. Rows whose target is ``ignore_index`` get a zero loss and a
zero gradient. Soft-capping (``softcap * tanh(x / softcap)``) is applied on the fly in both passes.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_approxbp.ops.kernel_launch import KernelLaunch

# Wide enough that a 128k vocabulary takes 32 slices per pass, narrow enough to stay in registers.
BLOCK_SIZE = 4096
NUM_WARPS = 8


@triton.jit
def _tanh(x):
    # tanh through exp (written out: the interpreter and every backend have exp); saturates cleanly.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# ignore_index is only compared with each row's target: a constant or divisibility hint for it
# would buy nothing and compile one more kernel per kind of value (0, 1, -100).
@triton.jit(do_not_specialize=["ignore_index"])
def _lce_softmax_grad_kernel(
    Logits_ptr,
    logits_row_stride,
    Target_ptr,
    Scale_ptr,
    scale_stride,
    Loss_ptr,
    n_cols,
    ignore_index,
    label_smoothing,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Logits_ptr + row * logits_row_stride
    target = tl.load(Target_ptr + row)
    offsets = tl.arange(0, BLOCK_SIZE)
    if target == ignore_index:
        tl.store(Loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offsets
                tl.store(row_ptr + cols, tl.zeros((BLOCK_SIZE,), tl.float32).to(Logits_ptr.dtype.element_ty),
                         mask=cols < n_cols)
        return

    running_max = float("-inf")
    running_sum = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        logit_sum += tl.sum(tl.where(mask, x, 0.0))
        x = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max))
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        target_logit = softcap * _tanh(target_logit / softcap)
    smoothing_per_class = label_smoothing / n_cols
    loss = lse - (1.0 - label_smoothing) * target_logit - smoothing_per_class * logit_sum
    tl.store(Loss_ptr + row, loss)

    if COMPUTE_GRAD:
        scale = tl.load(Scale_ptr + row * scale_stride).to(tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offsets
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                capped = _tanh(x / softcap)
                x = softcap * capped
            grad = tl.exp(x - lse) - smoothing_per_class
            grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - capped * capped)
            tl.store(row_ptr + cols, (grad * scale).to(Logits_ptr.dtype.element_ty), mask=mask)


def plan_softmax_grad(
    logits: Tensor,
    target: Tensor,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    compute_grad: bool,
) -> tuple[KernelLaunch, Tensor]:
    """The launch for a chunk's logits (rows contiguous), int64 targets and a 0-d or per-row fp32
    ``scale``, and the buffer of per-row losses (fp32) it fills."""
    losses = logits.new_empty(logits.shape[0], dtype=scale.dtype)
    launch = KernelLaunch(
        kernel=_lce_softmax_grad_kernel,
        grid=(logits.shape[0],),
        args={
            "Logits_ptr": logits, "logits_row_stride": logits.stride(0), "Target_ptr": target,
            "Scale_ptr": scale, "scale_stride": 0 if scale.dim() == 0 else scale.stride(0), "Loss_ptr": losses,
            "n_cols": logits.shape[1], "ignore_index": ignore_index, "label_smoothing": label_smoothing,
            "softcap": softcap if softcap else 1.0,
        },
        constexprs={"HAS_SOFTCAP": bool(softcap), "COMPUTE_GRAD": compute_grad, "BLOCK_SIZE": BLOCK_SIZE},
        num_warps=NUM_WARPS,
    )
    return launch, losses


def softmax_grad(
    logits: Tensor,
    target: Tensor,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    compute_grad: bool,
) -> Tensor:
    """The Triton twin of ``linear_cross_entropy._torch_softmax_grad``: per-row losses; with
    ``compute_grad`` the logits are overwritten with the scaled gradient."""
    if logits.shape[0] == 0:
        return logits.new_empty(0, dtype=scale.dtype)
    launch, losses = plan_softmax_grad(logits, target, scale, ignore_index, label_smoothing, softcap, compute_grad)
    launch.run()
    return losses
