"""The step memory of one rank of a model sharded with FSDP2's ``fully_shard``, simulated.

A model that ``fully_shard`` manages is simulated as FSDP2 itself runs it, on fake tensors and a
fake process group of the real shard group's size (``torch.testing._internal.distributed.fake_pg``,
backend ``"fake"``: its collectives return at once and move nothing):

1. a meta skeleton of the real model is made (:func:`~lightning_approxbp.conversion.sharded.meta_skeleton`:
   the same tree, unsharded shapes, no FSDP2 classes or hooks; the conversion already applied is in it);
2. it is copied onto fake tensors on the CPU and ``fully_shard`` is applied again to the same
   modules, in the same nesting, with each unit's ``mp_policy``, ``offload_policy`` and
   ``reshard_after_forward``, on a one-dimensional mesh over the fake group;
3. the steps run under :class:`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`, which
   sorts the rank's memory into sharded and unsharded parameters and gradients, the all-gather
   output and the reduce-scatter input of each unit, optimizer state, activations and temporaries.

So the rank's own shards (FSDP2 pads every rank's shard to the size of rank 0's, so rank 0's
figure is every rank's), their gradients and optimizer state are exact; activations are the
rank's batch's; the unsharded parameters of the unit running, the prefetched next unit's
all-gather and the reduce-scatter buffers are where FSDP2's own code puts them, in its order.

Left out, besides what :mod:`~lightning_approxbp.memory.estimate` leaves out: communication
buffers of the process group backend (NCCL's), the overlap of streams (on a GPU, FSDP2 frees a
unit's all-gather output once the compute stream used it; the simulation runs one stream), and
tensor parallelism or HSDP (refused).

Why not the unsharded simulation with modelled FSDP terms added: FSDPMemTracker runs FSDP2's real
hooks, so prefetch, the root unit staying unsharded between forward and backward, mixed-precision
copies and padding come from FSDP2 and not from a model of it; it runs on this CPU-only build (a
fake group can be made beside a running gloo group: ``new_group(backend="fake")``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils._pytree import tree_leaves

from lightning_approxbp.conversion.sharded import meta_skeleton
from lightning_approxbp.memory.checkpointing import (
    blocks_of,
    checkpoint_blocks,
    is_checkpointed,
)
from lightning_approxbp.memory.estimate import (
    NotesPeak,
    OptimizerFactory,
    StepFn,
    StepSimulation,
)
from lightning_approxbp.memory.planner import CheckpointPlan, plan_for
from lightning_approxbp.nn.norm import ConvertedNorm

_TOTAL = "Total"
_SHARDED_PARTS = {
    "parameters": _FSDPRefType.SHARDED_PARAM,
    "unsharded_parameters": _FSDPRefType.UNSHARDED_PARAM,
    "all_gather": _FSDPRefType.ALL_GATHER,
    "buffers": _FSDPRefType.BUFFER,
    "gradients": _FSDPRefType.SHARDED_GRAD,
    "unsharded_gradients": _FSDPRefType.UNSHARDED_GRAD,
    "reduce_scatter": _FSDPRefType.REDUCE_SCATTER,
    "optimizer_state": _FSDPRefType.OPT,
    "activations": _FSDPRefType.ACT,
    "temporaries": _FSDPRefType.TEMP,
    "inputs": _FSDPRefType.INP,
}


class _FSDPPeakTracker(NotesPeak, FSDPMemTracker):
    def __init__(self, root: FSDPModule, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        super().__init__(root, optimizer)
        self.device = device
        self.phase, self.module = "forward", ""


def _units(root: nn.Module) -> list[tuple[list[str], dict[str, Any]]]:
    """Each ``fully_shard`` call that made ``root``'s units, innermost first: module names and keywords.

    Raises:
        ValueError: for a unit on more than one mesh dimension (HSDP) or tensor-parallel parameters.
    """
    names = {id(module): name for name, module in root.named_modules()}
    seen: set[int] = set()
    calls = []
    for name, module in reversed(list(root.named_modules())):  # children before their parents
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None:
            calls.append(([name], {}))
            continue
        if id(group) in seen:
            continue
        seen.add(id(group))
        if group.mesh_info.mesh.ndim != 1:
            raise ValueError(
                "ApproxBP(memory_budget=...) simulates FSDP2 on a one-dimensional mesh; this model is sharded on a "
                f"{group.mesh_info.mesh.ndim}-dimensional one (HSDP or tensor parallelism)."
            )
        if any(fsdp_param.is_dtensor for fsdp_param in group.fsdp_params):
            raise ValueError("ApproxBP(memory_budget=...) cannot simulate tensor-parallel parameters under FSDP2.")
        calls.append((
            [names[id(m)] for m in group.modules],
            {
                "mp_policy": group.mp_policy,
                "offload_policy": group.offload_policy,
                "reshard_after_forward": group.post_forward_mesh_info is not None,
                "_size": group.mesh_info.shard_mesh_size,
            },
        ))
    return calls


def shard_group_size(root: nn.Module) -> int:
    """The size of the (one) group ``root``'s units shard over."""
    sizes = {kwargs["_size"] for _, kwargs in _units(root) if "_size" in kwargs}
    if len(sizes) > 1:
        raise ValueError(f"ApproxBP(memory_budget=...) needs every fully_shard unit on one mesh; found sizes {sorted(sizes)}.")
    return sizes.pop() if sizes else 1


@contextmanager
def fake_shard_mesh(size: int) -> Iterator[DeviceMesh]:
    """A one-dimensional CPU mesh of ``size`` ranks over a fake process group (collectives do nothing).

    Every rank of the default group must enter it (``new_group`` is collective); without a default
    group, one process stands for rank 0.
    """
    from torch.testing._internal.distributed.fake_pg import (
        FakeStore,  # registers the "fake" backend
    )

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
        group = dist.group.WORLD
    else:
        group = dist.new_group(ranks=list(range(size)), backend="fake")
    try:
        yield DeviceMesh.from_group(group, "cpu")
    finally:
        if own:
            dist.destroy_process_group()
        elif group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)


class ShardedStepSimulation(StepSimulation):
    """:class:`~lightning_approxbp.memory.StepSimulation` of one rank (rank 0) of an FSDP2-sharded model.

    ``model`` is the real sharded model (not changed); ``mesh`` a fake mesh of its shard group's
    size (:func:`fake_shard_mesh`). Only ``checkpointed`` blocks are measured (no offload).
    """

    parts_of: Mapping[str, Any] = _SHARDED_PARTS

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        mesh: DeviceMesh,
        *,
        step: StepFn | None = None,
        optimizer: str | OptimizerFactory = "adamw",
        precision: str = "32-true",
        share: tuple[object, ...] = (),
    ) -> None:
        self._mesh = mesh
        self._calls = _units(model)
        self._outputs: dict[nn.Module, int] = {}
        self._spans: dict[nn.Module, tuple[int, int]] = {}
        super().__init__(model, example_input, step=step, optimizer=optimizer, precision=precision, share=share)
        self.device = torch.device("cpu")

    def _fake_model(self, source: nn.Module, share: tuple[object, ...]) -> nn.Module:
        skeleton, _ = meta_skeleton(source)
        memo: dict[int, Any] = {id(obj): obj for obj in share}
        with self.mode:
            for tensor in (*skeleton.parameters(), *skeleton.buffers()):
                if id(tensor) not in memo:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    memo[id(tensor)] = nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake
        # a block checkpointed already holds its real module's bound forward: wrapped again on the copy
        checkpointed = [name for name, module in skeleton.named_modules() if is_checkpointed(module)]
        for name in checkpointed:
            del skeleton.get_submodule(name).forward
        fake_model = copy.deepcopy(skeleton, memo)
        checkpoint_blocks(fake_model, checkpointed)
        modules = dict(fake_model.named_modules())
        for module in modules.values():
            if isinstance(module, ConvertedNorm):
                # a kept affine reads min |weight| (no value on fake tensors): taken as safe, as at conversion
                fallback = bool(getattr(module, "exact_fallback", False))
                module._keeps_unsafe_affine = lambda fallback=fallback: fallback  # type: ignore[method-assign]
        with self.mode:
            for names, kwargs in self._calls:
                options = {key: value for key, value in kwargs.items() if not key.startswith("_")}
                targets = [modules[name] for name in names]
                fully_shard(targets if len(targets) > 1 else targets[0], mesh=self._mesh, **options)
        outermost = [m for m in fake_model.modules() if isinstance(m, FSDPModule)]
        self._root = outermost[0] if outermost else None
        inside = {id(p) for p in self._root.parameters()} if self._root is not None else set()
        stray = [name for name, p in fake_model.named_parameters() if id(p) not in inside]
        if self._root is None or stray:
            raise ValueError(
                "ApproxBP(memory_budget=...) on a model sharded with fully_shard needs one outermost fully_shard unit "
                f"holding every parameter; {stray[0] if stray else 'no parameter'} is outside it. Apply fully_shard "
                "to the module holding all layers too (as Lightning's FSDP2 guide does with the root)."
            )
        return fake_model

    def after_forward_only(self) -> None:
        """A forward under ``no_grad`` leaves FSDP2's state other than a training step does (measured: a
        step after it peaks higher): one more unmeasured step brings the steady state back."""
        self._run_step(None)

    def _new_tracker(self) -> MemTracker:
        assert isinstance(self._root, FSDPModule)
        tracker = _FSDPPeakTracker(self._root, self.optimizer, self.device)
        tracker.track_inputs(tuple(tree_leaves(self.inputs)))
        return tracker

    def _measure(self, checkpointed: tuple[str, ...], offloaded: tuple[str, ...]) -> Any:
        if offloaded:
            raise ValueError("Offload is not simulated for a model sharded with fully_shard.")
        if checkpointed:
            return super()._measure(checkpointed, offloaded)
        with self._block_spans():
            return super()._measure(checkpointed, offloaded)

    @contextmanager
    def _block_spans(self) -> Iterator[None]:
        """Note each block's tracked total when its forward starts and ends, and its output's bytes."""
        handles, current = [], {}

        def total() -> int:
            tracker = current.get("tracker")
            return 0 if tracker is None else tracker.get_tracker_snapshot().get(self.device, {}).get(_TOTAL, 0)

        for _, block in blocks_of(self.model):
            def pre(module: nn.Module, args: Any) -> None:
                self._spans[module] = (total(), 0)

            def post(module: nn.Module, args: Any, output: Any) -> None:
                self._spans[module] = (self._spans[module][0], total())
                storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tree_leaves(output)
                            if isinstance(t, Tensor)}
                self._outputs[module] = sum(storages.values())

            handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        original = self._new_tracker

        def new_tracker() -> MemTracker:
            current["tracker"] = original()
            return current["tracker"]

        self._new_tracker = new_tracker  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self._new_tracker
            for handle in handles:
                handle.remove()

    def module_stats(self, module: nn.Module) -> tuple[int, int, int]:
        """(total before, total after, output bytes) of a block's forward (inside its unit's all-gather)."""
        self.measure()
        before, after = self._spans.get(module, (0, 0))
        return before, after, self._outputs.get(module, 0)


def plan_sharded_checkpointing(
    model: nn.Module,
    example_input: Any,
    budget_bytes: int,
    *,
    step: StepFn | None = None,
    optimizer: str | OptimizerFactory = "adamw",
    precision: str = "32-true",
    share: tuple[object, ...] = (),
) -> CheckpointPlan:
    """:func:`~lightning_approxbp.memory.plan_checkpointing` for one rank of an FSDP2-sharded ``model``
    (checkpointing only), simulated as in the module docstring; ``model`` is not changed.

    Under a running process group every rank of it must call this (the fake group is made
    collectively); each computes the same plan from the same inputs.
    """
    with fake_shard_mesh(shard_group_size(model)) as mesh:
        simulation = ShardedStepSimulation(
            model, example_input, mesh, step=step, optimizer=optimizer, precision=precision, share=share
        )
        return plan_for(simulation, budget_bytes)
