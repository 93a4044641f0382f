"""Linear layer + cross-entropy that never materialises the logits of all tokens.

``cross_entropy(hidden @ weight.T + bias, target)`` for a causal LM's head keeps ``tokens x
vocab`` logits (plus their fp32 upcast and gradient): with a 128k vocabulary about 1.3 MB per
token, often the largest tensor of a fine-tuning step. This op walks the tokens in chunks; for
each chunk it computes the logits (one matmul in the compute dtype), turns them *in place* into
the gradient of the loss with respect to the logits (softmax math in fp32, one pass on CUDA:
:mod:`.linear_cross_entropy_triton`), and multiplies that gradient into the gradients of
``hidden``, ``weight`` and ``bias`` right away. At most one chunk of logits exists at a time.

Gradients are exact, not approximated: the same formula autograd applies, rounded where autograd
rounds (under autocast the logits and their gradient are rounded to the autocast dtype before
the matmuls, as in eager). The weight and bias gradients are accumulated over chunks in fp32,
in place into the one buffer that becomes the weight's gradient.

A weight of another dtype than the computation (an fp32 weight under bf16 autocast) is cast a
vocabulary slice at a time, where autocast would keep a whole cast copy of it (half the size
of the fp32 weight gradient, for the whole forward). On CPU, where a 16-bit matmul has no fp32
result, the products that are accumulated in fp32 (the weight gradient, and the hidden gradient
of a sliced weight) are 16-bit matmuls whose partial sums are rounded once and added in fp32, as
on CUDA, where the CPU computes the dtype natively (AVX512-BF16, AMX); elsewhere torch emulates
16-bit matmuls, several times slower than fp32, so they are computed from upcast operands
instead: products of 16-bit values are exact in fp32, so only the fp32 sum rounds.

Saved for backward (``reduction="mean"``/``"sum"``): the gradients computed in the forward (of
``hidden``: ``tokens x hidden``; of ``weight``/``bias`` when they require grad) -- backward only
scales them by the incoming gradient. Nothing of size ``tokens x vocab`` is saved. With
``reduction="none"`` the incoming gradient is per token and only known in backward, so the
forward saves ``hidden`` and the parameters (by reference) and backward recomputes the logits
chunk by chunk (one extra matmul per chunk).

Chunk size (:func:`default_chunk_size`): the largest power of two of tokens whose fp32 logits
fit in :data:`CHUNK_LOGITS_BYTES` (128 MiB: 256 tokens at a 128k vocabulary), at least
:data:`MIN_WEIGHT_GRAD_CHUNK` when the weight trains, at least 1 and at most the number of
tokens; the ``chunk_size`` keyword overrides it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approxbp.ops._utils import (
    check_floating,
    compute_dtype,
    cpu_computes_natively,
    guard_double_backward,
)
from lightning_approxbp.ops.dispatch import dispatch

OP_NAME = "linear_cross_entropy"
_TRITON_KERNELS = "lightning_approxbp.ops.linear_cross_entropy_triton"
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
CHUNK_LOGITS_BYTES = 128 << 20
# Each chunk adds its product into the whole fp32 weight gradient, reading and writing it: 2 x
# tokens flops per 8 bytes. When the weight trains, chunks of at least this many tokens (128 flops
# per byte) keep that pass from making the matmul memory-bound on a GPU; at a 128k vocabulary the
# chunk's logits and their fp32 copy are then 376 MiB, against a 2 GiB weight gradient per 4096 hidden.
MIN_WEIGHT_GRAD_CHUNK = 512
# Bytes of one vocabulary slice of an fp32 weight-shaped operand (a cast weight slice, its fp32
# upcast, a slice of the weight gradient): bounds the temporaries of the sliced matmuls.
_SLICE_BYTES = 32 << 20


def default_chunk_size(n_tokens: int, vocab: int, weight_trains: bool = False) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit in ``CHUNK_LOGITS_BYTES``,
    at least ``MIN_WEIGHT_GRAD_CHUNK`` when the weight trains, at most ``n_tokens``.

    Example::

        >>> default_chunk_size(4096, 128256)
        256
        >>> default_chunk_size(4096, 128256, weight_trains=True)
        512
        >>> default_chunk_size(10, 32000)
        10
    """
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
    rows = 1 << (rows.bit_length() - 1)
    if weight_trains:
        rows = max(rows, MIN_WEIGHT_GRAD_CHUNK)
    return max(1, min(n_tokens, rows))


# ----------------------------------------------------------------------------- PyTorch path


def _torch_softmax_grad(
    logits: Tensor,
    target: Tensor,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    compute_grad: bool,
) -> Tensor:
    """Per-row loss of a chunk (fp32); with ``compute_grad``, overwrite ``logits`` with
    ``scale * dloss/dlogits`` (rows of ignored targets get zeros). ``softcap`` 0 means none.

    Works in place on one fp32 copy of the chunk (two with soft-capping): the exponentials
    overwrite the logits, then the softmax and the gradient overwrite the exponentials.
    """
    z = logits.to(compute_dtype(logits.dtype))  # ``logits`` itself when it is already fp32
    if softcap:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    loss = -(1.0 - label_smoothing) * z.gather(1, safe_target).squeeze(1)
    if label_smoothing:
        loss -= (label_smoothing / z.shape[1]) * z.sum(dim=-1)
    row_max = z.amax(dim=-1, keepdim=True)
    exp = z.sub_(row_max) if compute_grad else z - row_max
    exp.exp_()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    loss += (row_max + sum_exp.log()).squeeze(1)
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:
        grad = exp.div_(sum_exp)
        if label_smoothing:
            grad -= label_smoothing / grad.shape[1]
        grad.scatter_add_(1, safe_target, torch.full_like(loss, label_smoothing - 1.0).unsqueeze(1))
        if softcap:
            grad *= capped.mul_(capped).neg_().add_(1.0)
        grad *= (scale * valid).unsqueeze(1)
        logits.copy_(grad)
    return loss


# ----------------------------------------------------------------------------- the chunk loop


def _check_targets(target: Tensor, vocab: int, ignore_index: int) -> None:
    # The kernels index the logits with the targets: an out-of-range target must not reach them.
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(
            f"{OP_NAME}: target {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}. "
            "Targets are class indices of the vocabulary; mark positions without a target with ignore_index."
        )


def _slices(matrix: Tensor) -> list[slice]:
    """Row slices of ``matrix`` (vocabulary x hidden) of about ``_SLICE_BYTES`` in fp32."""
    step = max(1, _SLICE_BYTES // (4 * max(matrix.shape[1], 1)))
    return [slice(start, start + step) for start in range(0, matrix.shape[0], step)]


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype and ``a``, ``b`` in it or 16-bit."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif sixteen_bit_products(acc.device, a.dtype):
        # The 16-bit matmul is the fast path: its partial sum is rounded once, then added in fp32.
        acc += a @ b
    else:
        # An emulated 16-bit matmul is slower than fp32: upcast (the products stay exact).
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def sixteen_bit_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the partial products accumulated in fp32 are computed by 16-bit matmuls (CUDA, and
    CPUs that compute ``dtype`` natively) or by fp32 matmuls of upcast operands (other CPUs)."""
    return device.type != "cpu" or cpu_computes_natively(dtype)


def _logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ weight.T + bias`` in the dtype of ``rows``; a weight of another dtype is cast by slices."""
    if weight.dtype == rows.dtype:
        return rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
    logits = rows.new_empty(rows.shape[0], weight.shape[0])
    for part in _slices(weight):
        cast = weight[part].to(rows.dtype)
        logits[:, part] = rows @ cast.t() if bias is None else torch.addmm(bias[part], rows, cast.t())
    return logits


def _hidden_grad(grad_logits: Tensor, weight: Tensor, out: Tensor) -> None:
    """``out = grad_logits @ weight``; a weight of another dtype is cast by slices, summed in fp32."""
    if weight.dtype == grad_logits.dtype:
        torch.mm(grad_logits, weight, out=out)
        return
    acc = out.new_zeros(out.shape, dtype=compute_dtype(out.dtype))
    for part in _slices(weight):
        _add_product(acc, grad_logits[:, part], weight[part].to(grad_logits.dtype))
    out.copy_(acc)


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, rows: Tensor) -> None:
    """``grad_weight += grad_logits.T @ rows`` in place, a vocabulary slice at a time."""
    if not sixteen_bit_products(grad_weight.device, rows.dtype):
        rows = rows.to(grad_weight.dtype)  # once per chunk rather than once per slice
    for part in _slices(grad_weight):
        _add_product(grad_weight[part], grad_logits[:, part].t(), rows)


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loop both custom ops run: per-row losses and the gradients asked for.

    ``hidden`` (tokens x hidden) and ``bias`` are in the compute dtype, ``weight`` in it or in its
    own (then cast by slices); ``scale`` is 0-d (every row) or one value per row. Gradients not
    asked for are empty tensors.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    _check_targets(target, vocab, ignore_index)
    accumulate = compute_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_zeros(weight.shape, dtype=accumulate) if need_weight else weight.new_empty(0)
    grad_bias = weight.new_zeros(vocab, dtype=accumulate) if need_bias else weight.new_empty(0)
    losses = hidden.new_empty(n_tokens, dtype=accumulate)
    compute_grad = need_hidden or need_weight or need_bias
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        rows = hidden[start:stop]
        logits = _logits(rows, weight, bias)
        row_scale = scale if scale.dim() == 0 else scale[start:stop]
        step = dispatch(OP_NAME, logits, _torch_softmax_grad, f"{_TRITON_KERNELS}:softmax_grad")
        losses[start:stop] = step(logits, target[start:stop], row_scale, ignore_index, label_smoothing, softcap, compute_grad)
        # From here on ``logits`` holds the gradient of the loss with respect to the logits.
        if need_hidden:
            _hidden_grad(logits, weight, grad_hidden[start:stop])
        if need_weight:
            _accumulate_weight_grad(grad_weight, logits, rows)
        if need_bias:
            grad_bias += logits.sum(dim=0, dtype=accumulate)
    return losses, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- torch.library


@torch.library.custom_op("approxbp::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (fp32) and, where asked, the gradients scaled by ``scale`` (empty otherwise)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked(
            hidden.contiguous(), weight, bias, target.contiguous(), scale, ignore_index, label_smoothing, softcap,
            chunk_size, need_hidden, need_weight, need_bias,
        )


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, target, scale, ignore_index, label_smoothing, softcap, chunk_size,
      need_hidden, need_weight, need_bias):
    accumulate = compute_dtype(hidden.dtype)
    return (
        hidden.new_empty(hidden.shape[0], dtype=accumulate),
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=accumulate) if need_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=accumulate) if need_bias else weight.new_empty(0),
    )


# ----------------------------------------------------------------------------- autograd


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T + bias, target)`` computed chunk by chunk.

    ``"mean"``/``"sum"``: the gradients are computed in the forward and saved (``tokens x
    hidden`` for ``hidden``, parameter-sized fp32 for ``weight``/``bias`` when they require
    grad); backward scales them. ``"none"``: saves ``hidden`` and the parameters (by reference)
    and recomputes the logits chunk by chunk in backward. Never saves ``tokens x vocab``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        reduction: str,
        options: tuple[int, float, float, int],
        dtype: torch.dtype,
        needs: tuple[bool, bool, bool],
    ) -> Tensor:
        ignore_index = options[0]
        rows, flat_target = hidden.reshape(-1, hidden.shape[-1]).to(dtype), target.reshape(-1).long()
        b = None if bias is None else bias.to(dtype)
        # fp32 (fp64 for fp64): the loss is accumulated in it, and transformers' loss is fp32 too.
        loss_dtype = compute_dtype(dtype)
        ctx.reduction, ctx.options, ctx.dtype, ctx.needs = reduction, options, dtype, needs
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        if reduction == "none":
            one = rows.new_ones((), dtype=compute_dtype(dtype))
            losses = linear_cross_entropy_forward(rows, weight, b, flat_target, one, *options, False, False, False)[0]
            ctx.save_for_backward(hidden, weight, bias, target)
            return losses.to(loss_dtype).view(target.shape)
        accumulate = compute_dtype(dtype)
        count = (flat_target != ignore_index).sum()
        # "mean" divides by the non-ignored tokens: no such token gives 0/0 = nan, as F.cross_entropy;
        # the gradient is then zero (every row is ignored), also as F.cross_entropy.
        one = rows.new_ones((), dtype=accumulate)
        scale = one / count.clamp(min=1) if reduction == "mean" else one
        losses, grad_hidden, grad_weight, grad_bias = linear_cross_entropy_forward(
            rows, weight, b, flat_target, scale, *options, *needs
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        total = losses.sum()
        return (total / count if reduction == "mean" else total).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        need_hidden, need_weight, need_bias = ctx.needs
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            dtype = ctx.dtype
            with torch.no_grad():
                rows = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
                b = None if bias is None else bias.to(dtype)
                _, grad_hidden, grad_weight, grad_bias = linear_cross_entropy_forward(
                    rows, weight, b, target.reshape(-1).long(), grad_output.reshape(-1).to(compute_dtype(dtype)).contiguous(),
                    *ctx.options, *ctx.needs,
                )
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_output.to(compute_dtype(ctx.dtype))
            # ``loss.backward()`` brings exactly 1: the saved gradients are the answer, and skipping
            # the multiply saves a weight-sized fp32 copy (a host sync on CUDA, as Liger's check;
            # not under torch.compile, which cannot branch on data). Fake tensors (the step-memory
            # simulation) have no value to compare: they take the branch of ``loss.backward()``.
            # (Tested after is_compiling: Dynamo cannot trace detect_fake_mode.)
            if torch.compiler.is_compiling() or (
                torch._guards.detect_fake_mode((scale,)) is None and not torch.equal(scale, torch.ones_like(scale))
            ):
                with torch.no_grad():
                    grad_hidden = grad_hidden * scale.to(grad_hidden.dtype) if need_hidden else grad_hidden
                    grad_weight = grad_weight * scale if need_weight else grad_weight
                    grad_bias = grad_bias * scale if need_bias else grad_bias
        grads = (
            grad_hidden.to(hidden_dtype).view(hidden_shape) if need_hidden else None,
            grad_weight.to(weight_dtype) if need_weight else None,
            grad_bias.to(weight_dtype) if need_bias else None,
        )
        grads = guard_double_backward(grads, grad_output, OP_NAME)
        return (*grads, None, None, None, None, None)


# ----------------------------------------------------------------------------- entry point


def _check_inputs(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, reduction: str, label_smoothing: float,
    logit_softcap: float | None, chunk_size: int | None,
) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        check_floating(tensor, OP_NAME, name)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP_NAME}: target must hold class indices (int64), got {target.dtype}; use target.long().")
    if weight.dim() != 2 or hidden.dim() == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{OP_NAME}: weight must be (vocab, {hidden.shape[-1] if hidden.dim() else 'hidden'}) to match hidden of "
            f"shape {tuple(hidden.shape)}, got {tuple(weight.shape)} (nn.Linear's layout: out_features x in_features)."
        )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{OP_NAME}: target must have hidden's shape without its last dimension, {tuple(hidden.shape[:-1])}, "
            f"got {tuple(target.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP_NAME}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}.")
    devices = {t.device for t in (hidden, weight, target, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{OP_NAME}: all inputs must be on one device, got {', '.join(map(str, sorted(devices, key=str)))}.")
    if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
        raise TypeError(
            f"{OP_NAME}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them or run under "
            "torch.autocast, which computes both in the autocast dtype."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP_NAME}: reduction={reduction!r} is unknown; use one of {REDUCTIONS}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP_NAME}: label_smoothing must be in [0, 1], got {label_smoothing!r}.")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"{OP_NAME}: logit_softcap must be positive or None, got {logit_softcap!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP_NAME}: chunk_size must be a positive int or None, got {chunk_size!r}.")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without the full logits.

    Exact loss and gradients (fp32 softmax and accumulation), computed ``chunk_size`` tokens at a
    time (default: :func:`default_chunk_size`), so that one chunk of logits exists at a time and
    nothing of size ``tokens x vocab`` is saved for backward. Semantics are ``F.cross_entropy``'s:
    ``"mean"`` averages over tokens whose target is not ``ignore_index`` (all ignored, or no
    tokens: ``nan``, with zero gradients), ``"sum"`` adds them (0 when there are none), ``"none"``
    returns one loss per token (0 where ignored). ``logit_softcap`` applies Gemma's
    ``softcap * tanh(logits / softcap)`` before the loss. Under autocast the matmuls run in the
    autocast dtype. The loss is fp32 (fp64 for fp64 inputs) also for 16-bit inputs, unlike
    ``F.cross_entropy``'s 16-bit result: it is accumulated in fp32. No weight gradient is
    computed for a frozen ``weight``.

    Args:
        hidden: ``(..., hidden)`` inputs of the head.
        weight: ``(vocab, hidden)``, ``nn.Linear``'s layout (may be tied to an embedding).
        target: class indices of shape ``hidden.shape[:-1]``.
        bias: optional ``(vocab,)``.
        ignore_index, reduction, label_smoothing: as in ``F.cross_entropy``.
        logit_softcap: cap of the logits, or ``None``.
        chunk_size: tokens per chunk.

    Raises:
        TypeError: for non-floating inputs, non-integer targets, or mixed dtypes outside autocast.
        ValueError: for mismatched shapes or devices, bad options, or targets outside the vocabulary.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> hidden, weight = torch.randn(2, 5, 16, requires_grad=True), torch.randn(100, 16)
        >>> target = torch.randint(0, 100, (2, 5))
        >>> loss = linear_cross_entropy(hidden, weight, target, chunk_size=4)
        >>> torch.allclose(loss, F.cross_entropy((hidden @ weight.T).flatten(0, 1), target.flatten()))
        True
        >>> loss.backward()
    """
    _check_inputs(hidden, weight, target, bias, reduction, label_smoothing, logit_softcap, chunk_size)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    n_tokens = target.numel()
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    chunk = chunk_size or default_chunk_size(n_tokens, weight.shape[0], needs[1])
    options = (int(ignore_index), float(label_smoothing), float(logit_softcap or 0.0), int(chunk))
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, target, reduction, options, dtype, needs)
