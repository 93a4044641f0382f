"""The launches the ahead-of-time compile check builds: the launchers' plans over the input
properties that Triton's JIT specialises on.

Triton compiles one kernel per specialisation: the constexprs, ``num_warps``, each pointer's
dtype and, for every other runtime argument, what the JIT reads from its value (an int equal to
1 becomes a constant, an int divisible by 16 and a 16-byte-aligned pointer get a divisibility
hint; :func:`jit_property`). The check plans each launcher (``plan_forward`` /
``plan_backward``) on meta tensors, whose ``data_ptr`` is their byte offset, over:

- **configurations**: each dtype and dtype pair, activation, code width and norm flag
  combination the ops accept (RMSNorm never has a bias: the functional, nn and conversion
  entry points pass none);
- **layouts**: one size per distinct combination of JIT properties of the ints the launcher
  derives from it (numel and code bytes, row length and the row strides, vocabulary), found by
  searching sizes over more than a period of those properties (:func:`size_representatives`),
  crossed with each alignment of the tensors the caller hands over (inputs and incoming
  gradients: an offset view starts anywhere). Buffers the launchers or ops allocate (outputs,
  codes, statistics, fp32 copies, the logits chunk) are always aligned; parameters are their
  own allocations.

Every configuration is built on the common layout (sizes divisible by 16, aligned tensors), and
every layout on each kernel shape (kernel, block, warps, code width) and element size, with the
switches that only change arithmetic between the loads and stores held at one value
(:data:`LAYOUT_CONFIGS`): the activation, the norm's affine (LayerNorm with weight and bias
reads every pointer), soft-capping, and fp16 against bf16 (both 2-byte elements, loaded and
stored alike). Alignment and divisibility change how memory is accessed, and every access is
built on every layout that way. This keeps the check to about 1,500 compiles for two
architectures where the full product is about 5,200.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from lightning_approxbp.ops._utils import packed_size
from lightning_approxbp.ops.dispatch import TRITON_DTYPES
from lightning_approxbp.ops.kernel_launch import KernelLaunch

# Sizes searched for representatives: a large aligned one first (so that it represents the
# common class), then every size past all periods of the properties (16 for an int, 128
# elements for the bytes of 1-bit codes) and, for rows, past the longest fused row.
_ELEMENT_SEARCH = (1 << 20, *range(1, 257))
_ROW_SEARCH = (*(1 << p for p in range(4, 18)), *range(1, 8193))
_ROWS = 4096
# The logits chunk: aligned rows (LLaMA-3), odd rows (GPT-2), a single class.
_VOCABULARIES = (128256, 50257, 1)
_CHUNK_ROWS = 256

# The values of the arithmetic-only switches that every layout is built with, per op: one dtype
# per element size, the activations of the common models, the norm that reads every pointer
# ((centered, has_weight, has_bias): LayerNorm with weight and bias), no soft-capping.
LAYOUT_CONFIGS: dict[str, tuple] = {
    "dtype": (torch.float32, torch.bfloat16),
    "step_activation": ("gelu",),
    "gated_mlp": ("silu",),
    "ms_norm": ((True, True, True),),
    "softcap": (0.0,),
}


def jit_property(value: Any) -> tuple[str, Any]:
    """What Triton's JIT specialises on for one runtime argument: its type and attribute."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


def size_representatives(
    search: Iterable[int], derived: Callable[[int], tuple[int, ...]], shape: Callable[[int], Any] = lambda _: None
) -> dict[int, bool]:
    """The first size of ``search`` per kernel ``shape`` and distinct combination of JIT
    properties of the ints that ``derived`` computes from a size (as the launcher does), each
    mapped to whether all those ints are divisible by 16 (the common layout)."""
    found: dict[tuple, int] = {}
    for size in search:
        properties = tuple(jit_property(v) for v in derived(size))
        found.setdefault((shape(size), properties), size)
    return {size: all(p[1] == "D" for p in key[1]) for key, size in found.items()}


def placed(shape: tuple[int, ...] | int, dtype: torch.dtype, aligned: bool) -> torch.Tensor:
    """A contiguous meta tensor that starts 16-byte aligned, or one element past that (a view)."""
    shape = (shape,) if isinstance(shape, int) else shape
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty(torch.Size(shape).numel() + 1, dtype=dtype, device="meta")[1:].view(shape)


def _every_layout(all_layouts: bool, op: str, config: Any, *dtypes: torch.dtype) -> bool:
    """Whether a configuration is built on every layout (else on the common one only)."""
    return all_layouts and config in LAYOUT_CONFIGS[op] and all(d in LAYOUT_CONFIGS["dtype"] for d in dtypes)


def _layouts(sizes: dict[int, bool], tensors: int, every: bool) -> Iterator[tuple[int, tuple[bool, ...]]]:
    """(size, alignment of each caller tensor): all of them, or only the common layout."""
    for size, divisible in sizes.items():
        for alignments in itertools.product((True, False), repeat=tensors):
            if every or (divisible and all(alignments)):
                yield size, alignments


# ----------------------------------------------------------------------------- the launchers


def step_activation_launches(all_layouts: bool = True) -> Iterator[KernelLaunch]:
    from lightning_approxbp.activations import ACTIVATIONS
    from lightning_approxbp.ops import step_activation_triton as kernels
    from lightning_approxbp.tables import SUPPORTED_BITS, get_table

    nonfinite = torch.empty(1, dtype=torch.int32, device="meta")
    for bits, dtype in itertools.product(SUPPORTED_BITS, TRITON_DTYPES):
        sizes = size_representatives(_ELEMENT_SEARCH, lambda n, bits=bits: (n, packed_size(n, bits)))
        for activation in ACTIVATIONS:
            thresholds = list(get_table(activation, bits).thresholds)
            every = _every_layout(all_layouts, "step_activation", activation, dtype)
            for n, (aligned,) in _layouts(sizes, 1, every):
                yield kernels.plan_forward(placed(n, dtype, aligned), thresholds, activation, bits)[0]
        # The backward has no activation switch. Codes are the forward's buffer.
        levels = list(get_table("gelu", bits).levels)
        every = _every_layout(all_layouts, "step_activation", "gelu", dtype)
        for n, (aligned,) in _layouts(sizes, 1, every):
            codes = torch.empty(packed_size(n, bits), dtype=torch.uint8, device="meta")
            yield kernels.plan_backward(placed(n, dtype, aligned), codes, nonfinite, levels, bits)[0]


def gated_mlp_launches(all_layouts: bool = True) -> Iterator[KernelLaunch]:
    from lightning_approxbp.activations import ACTIVATIONS
    from lightning_approxbp.ops import gated_mlp_triton as kernels

    sizes = size_representatives(_ELEMENT_SEARCH, lambda n: (n,))
    for dtype, activation in itertools.product(TRITON_DTYPES, ACTIVATIONS):
        every = _every_layout(all_layouts, "gated_mlp", activation, dtype)
        # The backward reads the forward's inputs g and u and the incoming gradient.
        for n, (g_aligned, u_aligned, grad_aligned) in _layouts(sizes, 3, every):
            g, u = placed(n, dtype, g_aligned), placed(n, dtype, u_aligned)
            if grad_aligned:
                yield kernels.plan_forward(g, u, activation)[0]
            yield kernels.plan_backward(placed(n, dtype, grad_aligned), g, u, activation)[0]


def ms_norm_launches(all_layouts: bool = True) -> Iterator[KernelLaunch]:
    from lightning_approxbp.ops import ms_norm_triton as kernels

    # Rows are contiguous, so the row strides are the row length and share its properties.
    widths = size_representatives(_ROW_SEARCH, lambda n: (n,), kernels.row_config)
    # LayerNorm with any affine, RMSNorm without a bias.
    flags = [f for f in itertools.product((True, False), repeat=3) if f[0] or not f[2]]
    for (in_dtype, out_dtype), (centered, has_weight, has_bias) in itertools.product(
        itertools.product(TRITON_DTYPES, repeat=2), flags
    ):
        every = _every_layout(all_layouts, "ms_norm", (centered, has_weight, has_bias), in_dtype, out_dtype)
        # x in the forward and the incoming gradient in the backward are the caller's tensors.
        for n_cols, (aligned,) in _layouts(widths, 1, every):
            weight = torch.empty(n_cols, dtype=in_dtype, device="meta") if has_weight else None
            bias = torch.empty(n_cols, dtype=in_dtype, device="meta") if has_bias else None
            x = placed((_ROWS, n_cols), in_dtype, aligned)
            launch, y, rstd = kernels.plan_forward(x, weight, bias, 1e-5, centered, 0.0, out_dtype)
            yield launch
            grad = placed(tuple(y.shape), y.dtype, aligned)
            yield kernels.plan_backward(grad, y, rstd, weight, bias, centered, 0.0, 1e-4, x.dtype)[0]


def linear_cross_entropy_launches(all_layouts: bool = True) -> Iterator[KernelLaunch]:
    from lightning_approxbp.ops import linear_cross_entropy_triton as kernels

    # The logits chunk is the op's own buffer; the targets (and a per-row scale) are sliced per
    # chunk from the caller's. The scale is 0-d in the forward, per row in the backward of
    # reduction="none", and unused when no gradient is needed.
    sizes = {vocab: jit_property(vocab)[1] == "D" for vocab in _VOCABULARIES}
    for dtype, softcap in itertools.product(TRITON_DTYPES, (0.0, 30.0)):
        every = _every_layout(all_layouts, "softcap", softcap, dtype)
        for vocab, (aligned,) in _layouts(sizes, 1, every):
            logits = torch.empty(_CHUNK_ROWS, vocab, dtype=dtype, device="meta")
            target = placed(_CHUNK_ROWS, torch.int64, aligned)
            scalar, per_row = torch.empty((), device="meta"), placed(_CHUNK_ROWS, torch.float32, aligned)
            yield kernels.plan_softmax_grad(logits, target, scalar, -100, 0.0, softcap, False)[0]
            for scale in (scalar, per_row):
                yield kernels.plan_softmax_grad(logits, target, scale, -100, 0.1, softcap, True)[0]


def all_launches(all_layouts: bool = True) -> Iterator[KernelLaunch]:
    """Every launch of every launcher, with repeats (:func:`aot_compile.compile_specs` keeps each
    specialisation once); ``all_layouts=False``: every configuration on the common layout only."""
    launchers = (step_activation_launches, gated_mlp_launches, ms_norm_launches, linear_cross_entropy_launches)
    return itertools.chain.from_iterable(launcher(all_layouts) for launcher in launchers)
