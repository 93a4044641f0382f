"""Repeated blocks: verify one representative per block kind instead of the whole model.

A *block kind* is a set of sibling modules of a container (``nn.ModuleList``,
``nn.Sequential``) with one structural signature, such as the decoder layers of a LLaMA: at
least two, each with children of its own. Conversion changes every member the same way, so
checking one member checks them all, with the tolerance of one block (the error of a
whole-model check grows with depth, which once refused an 80-layer model whose every block was
exact to bf16 rounding).

The representative is checked on random inputs of the shapes and dtypes it was called with
during the probe (:func:`capture_inputs` records them; no values are kept), so the check needs
neither the real activations nor a forward of the whole model. Arguments that are neither
tensors nor plain values (a key/value cache, for instance) are passed as ``None``: they are
state the block updates, and a cache filled by the probe would add its keys to the check.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_approxbp.conversion.structure import StructureCache
    >>> from lightning_approxbp.conversion.walker import sites
    >>> block = lambda: nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    >>> model = nn.Sequential(nn.Embedding(10, 8), nn.ModuleList([block(), block(), block()]))
    >>> [(kind.representative.fqn, len(kind.members)) for kind in block_kinds(list(sites(model)), StructureCache())]
    [('1.0', 3)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_approxbp.conversion.probe import isolated, output_tensors
from lightning_approxbp.conversion.structure import StructureCache
from lightning_approxbp.conversion.walker import Site

_CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class TensorShape:
    """What a captured input tensor looked like: enough to draw another one."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def draw(self, generator: torch.Generator) -> Tensor:
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.ones(self.shape, dtype=torch.bool)
        return torch.zeros(self.shape, dtype=self.dtype)  # indices and positions: 0 is always valid


@dataclass
class BlockKind:
    """The members of one block kind, in model order, and the inputs its first member was called with."""

    members: list[Site]
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = field(default=None)

    @property
    def representative(self) -> Site:
        return self.members[0]

    def draw_inputs(self, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Random inputs of the captured shapes and dtypes (on the CPU); other arguments as captured."""
        if self.inputs is None:
            raise RuntimeError(f"{self.representative.fqn} was not called by the probe.")
        generator = torch.Generator().manual_seed(seed)
        return tree_map(lambda leaf: leaf.draw(generator) if isinstance(leaf, TensorShape) else leaf, self.inputs)


def block_kinds(all_sites: Sequence[Site], structure: StructureCache) -> list[BlockKind]:
    """The block kinds of a model (outermost only: blocks inside a block are covered by it)."""
    by_module = {id(site.module): site for site in all_sites}
    kinds: list[BlockKind] = []
    covered: set[int] = set()
    for site in all_sites:
        if not isinstance(site.module, _CONTAINERS) or id(site.module) in covered:
            continue
        groups: dict[Any, list[Site]] = {}
        for child in site.module.children():
            if next(child.children(), None) is not None:
                groups.setdefault(structure.signature(child), []).append(by_module[id(child)])
        for members in groups.values():
            if len(members) > 1:
                kinds.append(BlockKind(members))
                covered.update(id(m) for member in members for m in member.module.modules())
    return kinds


def _shape_or_plain(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return TensorShape(tuple(leaf.shape), leaf.dtype)
    return leaf if isinstance(leaf, (int, float, str, bool, type(None), torch.dtype)) else None


@contextmanager
def capture_inputs(kinds: Sequence[BlockKind]) -> Iterator[None]:
    """Record the shapes and dtypes of the first call of every representative inside the block."""

    def recorder(kind: BlockKind):
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if kind.inputs is None:
                kind.inputs = tree_map(_shape_or_plain, (args, kwargs))

        return record

    handles = [
        kind.representative.module.register_forward_pre_hook(recorder(kind), with_kwargs=True) for kind in kinds
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_outputs(module: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> list[Tensor]:
    """The floating outputs of one forward of ``module`` on ``inputs`` (train mode, fixed seed),
    each followed by what the block added to its first input, where the shapes match.

    The difference is what a residual block computes: compared on its own, a change in the
    branch is not hidden by a residual stream that is much larger than the branch. In fp32 and
    fp64 only: a 16-bit output's rounding alone is a large part of a small difference.
    """
    args, kwargs = inputs
    first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.is_floating_point()), None)
    with isolated(module), torch.no_grad():
        outputs = output_tensors(module(*args, **kwargs))
    compared = []
    for out in outputs:
        compared.append(out)
        if first is not None and out.shape == first.shape and out.dtype in (torch.float32, torch.float64):
            compared.append(out.double() - first.double())
    return compared
