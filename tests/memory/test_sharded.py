"""The per-rank step simulation of an FSDP2-sharded model, in one process (no Lightning): a fake
process group of two ranks stands for the real one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from lightning_approxbp.memory import checkpoint_blocks, estimate_step_memory
from lightning_approxbp.memory.sharded import (
    ShardedStepSimulation,
    fake_shard_mesh,
    plan_sharded_checkpointing,
)

pytestmark = pytest.mark.filterwarnings("ignore:Module is None")

WIDTH, BLOCKS, BATCH = 48, 3, 32  # 4 * 48 + 1 output rows: not a multiple of 2, so shards are padded


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH + 1), nn.GELU(), nn.Linear(4 * WIDTH + 1, WIDTH))
            for _ in range(BLOCKS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture
def two_fake_ranks() -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _sharded() -> Stack:
    model = Stack()
    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _shard_bytes(model: nn.Module) -> int:
    """The rank's parameter storage: FSDP2 pads each shard to ceil(dim 0 / 2) rows."""
    return sum(
        fsdp_param._sharded_param_data.numel() * fsdp_param._sharded_param_data.element_size()
        for module in model.modules() if hasattr(module, "_get_fsdp_state")
        if (group := module._get_fsdp_state()._fsdp_param_group) is not None
        for fsdp_param in group.fsdp_params
    )


@pytest.mark.usefixtures("two_fake_ranks")
def test_the_rank_holds_its_padded_shards_their_gradients_and_optimizer_state() -> None:
    model, batch = _sharded(), torch.randn(BATCH, WIDTH)
    full = sum(p.numel() * 4 for p in Stack().parameters())
    with fake_shard_mesh(2) as mesh:
        estimate = ShardedStepSimulation(model, batch, mesh).measure()
    shard = _shard_bytes(model)
    assert full // 2 < shard < full // 2 + 4 * 1024  # padded
    assert estimate.parts["parameters"] == shard
    steps = 4 * sum(1 for _ in model.parameters())  # AdamW's fp32 step counter per parameter
    assert estimate.parts["optimizer_state"] == 2 * shard + steps
    # the unsharded step: the whole model's parameters, no FSDP2 buffers
    whole = estimate_step_memory(Stack(), batch)
    assert whole.parts["parameters"] == full and whole.peak_bytes > estimate.peak_bytes
    assert estimate.parts["all_gather"] + estimate.parts["unsharded_parameters"] + estimate.parts["reduce_scatter"] > 0
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())  # the model is untouched


@pytest.mark.usefixtures("two_fake_ranks")
def test_the_plan_is_the_same_every_time_and_checkpointing_lowers_the_rank_peak() -> None:
    model, batch = _sharded(), torch.randn(BATCH, WIDTH)
    with fake_shard_mesh(2) as mesh:
        simulation = ShardedStepSimulation(model, batch, mesh)
        none, every = simulation.measure(), simulation.measure(tuple(f"blocks.{i}" for i in range(BLOCKS)))
    assert every.peak_bytes < none.peak_bytes
    budget = (none.peak_bytes + every.peak_bytes) // 2
    plans = [plan_sharded_checkpointing(model, batch, budget) for _ in range(2)]
    assert plans[0].blocks == plans[1].blocks and plans[0].after == plans[1].after
    assert 1 <= len(plans[0].blocks) and plans[0].after.peak_bytes <= budget < plans[0].one_fewer_peak_bytes
    assert plans[0].recompute_flops > 0
    checkpoint_blocks(model, plans[0].blocks)  # composes with the units: module tree and keys unchanged
    assert list(model.state_dict()) == list(_sharded().state_dict())
    with pytest.raises(ValueError, match="cannot be met"):
        plan_sharded_checkpointing(model, batch, every.peak_bytes - 1)
