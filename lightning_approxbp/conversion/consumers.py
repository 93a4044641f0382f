"""Follow every use of each norm's output during one probe forward.

The probe runs under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch
function and tensor method called in Python, and forward hooks that keep the stack of running
modules. A norm's output is tracked from the moment its module returns it; ops that only
alias it (views, slicing, ``reshape`` without copy, no-op ``to``/``contiguous``) produce tensors
that are tracked too. Any other op reading a tracked tensor is a *use*, attributed to the
innermost running module. Tensors returned by the probe are uses as well (the caller sees them).

A use is *mergeable* when it is the input read of a registered consumer layer
(:data:`~lightning_approxbp.conversion.merged.CONSUMER_KINDS`) with its own weight, the tensor
keeps the feature axis last and contiguous, and that layer never reads anything else.

A dropout module's output made from a norm output is a new tensor (in training), not a use to
follow; the consumer layers that read it are recorded all the same
(:attr:`NormUses.through_dropout`), so that the report can say why they keep their own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_approxbp.conversion.merged import consumer_kind
from lightning_approxbp.saved_tensors import storage_id

# Functions that return no tensor but read data (everything else without a tensor result is metadata).
_DATA_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"})


@dataclass
class Use:
    """One read of a norm output.

    Attributes:
        op: the function name (``"linear"``, ``"add"``, ``"returned"``...).
        module_fqn: the innermost module running when it happened (``""`` for the root or none).
        consumer: the consumer layer, when the read is a mergeable layer input.
    """

    op: str
    module_fqn: str
    consumer: nn.Module | None = None

    def describe(self) -> str:
        return f"{self.op} in {self.module_fqn}" if self.module_fqn else self.op


@dataclass
class NormUses:
    """Every use of one norm's output seen during the probe."""

    uses: list[Use] = field(default_factory=list)
    called: bool = False
    # (consumer layer fqn, dropout fqn): layers that read this output after a dropout module
    through_dropout: list[tuple[str, str]] = field(default_factory=list)

    @property
    def layer_readers(self) -> list[str]:
        """The fqns of the layers that read this output as their input (mergeable or not)."""
        return list(dict.fromkeys(use.module_fqn for use in self.uses if use.op.startswith(("linear", "addmm"))))

    @property
    def consumers(self) -> list[nn.Module]:
        unique: dict[int, nn.Module] = {}
        for use in self.uses:
            if use.consumer is not None:
                unique.setdefault(id(use.consumer), use.consumer)
        return list(unique.values())

    @property
    def all_mergeable(self) -> bool:
        return bool(self.uses) and all(use.consumer is not None for use in self.uses)

    @property
    def all_linear(self) -> bool:
        """Every use is a layer input read (mergeable or not): an autocast output dtype is free."""
        return bool(self.uses) and all(use.op in ("linear", "addmm") for use in self.uses)

    def blockers(self) -> list[str]:
        return sorted({use.describe() for use in self.uses if use.consumer is None})


def _feature_aligned(tensor: Tensor, features: int | None) -> bool:
    """Element ``j`` of the last axis is feature ``j`` of the norm (so the affine commutes)."""
    if features is None or tensor.dim() == 0 or tensor.shape[-1] != features or tensor.stride(-1) != 1:
        return False
    return tensor.storage_offset() % features == 0 and all(
        s % features == 0 for size, s in zip(tensor.shape[:-1], tensor.stride()[:-1]) if size > 1
    )


def _is_inplace(name: str, kwargs: dict) -> bool:
    if "out" in kwargs:
        return True
    if name.startswith("__i") or name == "__setitem__":
        return True
    return name.endswith("_") and not name.endswith("__")


def _storage(tensor: Tensor) -> int:
    return storage_id(tensor)


class _Tracer(TorchFunctionMode):
    def __init__(self, norms: dict[nn.Module, int | None], fqns: dict[nn.Module, str]) -> None:
        super().__init__()
        self.norms = norms
        self.fqns = fqns
        self.tracked: dict[int, tuple[Tensor, nn.Module]] = {}
        self.stack: list[nn.Module] = []
        self.uses: dict[nn.Module, NormUses] = {norm: NormUses() for norm in norms}
        # dropout outputs made from a norm output: id -> (tensor, norm, dropout fqn)
        self.dropped: dict[int, tuple[Tensor, nn.Module, str]] = {}
        # every input read of a registered consumer: the norm it came from (None: something else)
        self.consumer_reads: dict[nn.Module, set[Any]] = {}

    def track(self, tensor: Tensor, norm: nn.Module) -> None:
        self.tracked[id(tensor)] = (tensor, norm)

    def source(self, tensor: Any) -> nn.Module | None:
        entry = self.tracked.get(id(tensor)) if isinstance(tensor, Tensor) else None
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        module = self.stack[-1] if self.stack else None
        inputs = [(t, self.source(t)) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        tracked = [(t, norm) for t, norm in inputs if norm is not None]
        self._record_consumer_read(func, args, kwargs, module, inputs)
        if not tracked:
            return out
        name = getattr(func, "__name__", str(func))
        results = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not results and name not in _DATA_READS:
            return out  # metadata: shape, dtype, stride...
        if results and not _is_inplace(name, kwargs):
            storages = {_storage(t): norm for t, norm in tracked}
            if all(_storage(r) in storages for r in results):
                for r in results:
                    self.track(r, storages[_storage(r)])
                return out
        for tensor, norm in tracked:
            self.uses[norm].uses.append(self._use(func, name, args, kwargs, module, tensor, norm))
        return out

    def _use(self, func, name, args, kwargs, module, tensor, norm) -> Use:
        fqn = self.fqns.get(module, "") if module is not None else ""
        kind = consumer_kind(module) if module is not None else None
        mergeable = (
            kind is not None
            and kind.reads(func, args, kwargs, module, tensor)
            and _feature_aligned(tensor, self.norms[norm])
        )
        return Use(name, fqn, module if mergeable else None)

    def _record_consumer_read(self, func, args, kwargs, module, inputs) -> None:
        kind = consumer_kind(module) if module is not None else None
        if kind is None or func is not kind.op:
            return
        for tensor, _ in inputs:
            entry = self.dropped.get(id(tensor))
            if entry is not None and entry[0] is tensor and kind.reads(func, args, kwargs, module, tensor):
                self.uses[entry[1]].through_dropout.append((self.fqns.get(module, ""), entry[2]))
        sources = self.consumer_reads.setdefault(module, set())
        matched = [norm for t, norm in inputs if kind.reads(func, args, kwargs, module, t)]
        sources.add(matched[0] if matched else None)

    def finish(self, output: Any) -> dict[nn.Module, NormUses]:
        for leaf in tree_leaves(output):
            norm = self.source(leaf)
            if norm is None and isinstance(leaf, Tensor):
                norm = next((n for t, n in self.tracked.values() if _storage(t) == _storage(leaf)), None)
            if norm is not None:
                self.uses[norm].uses.append(Use("returned", ""))
        for norm_uses in self.uses.values():
            for use in norm_uses.uses:
                # a layer that also reads other tensors (or another norm) cannot apply this affine
                if use.consumer is not None and len(self.consumer_reads.get(use.consumer, ())) != 1:
                    use.consumer = None
                    use.op = f"{use.op} (layer also reads other inputs)"
        return self.uses


@contextmanager
def trace_norm_uses(root: nn.Module, norms: dict[nn.Module, int | None]) -> Iterator[_Tracer]:
    """Context manager: run the probe inside, then call ``tracer.finish(output)``.

    Args:
        root: the model (hooks go on all its modules).
        norms: each norm module to follow, mapped to its number of features (``None`` when it
            normalises several axes: its affine cannot move into a linear layer).
    """
    fqns = {module: name for name, module in root.named_modules()}
    tracer = _Tracer(norms, fqns)

    def push(module: nn.Module, args: Any) -> None:
        tracer.stack.append(module)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        tracer.stack.pop()
        if module in norms and isinstance(output, Tensor):
            tracer.uses[module].called = True
            tracer.track(output, module)
        elif isinstance(module, _DropoutNd) and args and isinstance(output, Tensor):
            norm = tracer.source(args[0])
            if norm is not None and output is not args[0]:
                tracer.dropped[id(output)] = (output, norm, fqns[module])

    handles = []
    for module in fqns:
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        with tracer:
            yield tracer
    finally:
        for handle in handles:
            handle.remove()
