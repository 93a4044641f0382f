"""Saved-tensor offload: a block's saved tensors really leave the device, nothing it computes changes,
the simulation counts them off the device, and the planner offloads only when asked and where it pays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_approxbp.memory import (
    OffloadCost,
    StepSimulation,
    apply_plan,
    blocks_of,
    checkpoint_blocks,
    is_checkpointed,
    is_offloaded,
    offload_blocks,
    plan_checkpointing,
)
from lightning_approxbp.memory.offload import SIMULATED_HOST
from lightning_approxbp.saved_tensors import SavedTensorCounter, storage_id
from tests.memory.models import VOCAB, loss_and_grads, tiny_bert, tiny_llama
from tests.tolerances import IDENTICAL

pytestmark = pytest.mark.filterwarnings("ignore:Module is None")

# A CPU-only machine has no second device with values. ``cpu:0`` is not equal to the ``cpu`` that CPU
# tensors report, so with it as the host every saved tensor takes the copy path (to a new CPU tensor
# in forward, back in backward) with real values: the path a CUDA tensor takes to pinned memory.
COPYING_HOST = torch.device("cpu", 0)
FAST_LINK = OffloadCost(host_bandwidth=1e18)  # offload modelled as nearly free: every block offloads
SLOW_LINK = OffloadCost(host_bandwidth=1.0)  # one byte per second: offload never pays


def _llama(layers: int = 4) -> tuple[nn.Module, dict]:
    model, _ = tiny_llama(layers)
    ids = torch.randint(0, VOCAB, (8, 64))
    return model, {"input_ids": ids, "labels": ids}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))


def test_on_the_host_offload_is_a_no_op():
    block = _mlp()
    (wrapper,) = offload_blocks(nn.Sequential(block), ["0"])  # the default host is the CPU
    block(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert wrapper.moved_bytes == 0


def test_every_saved_activation_is_copied_to_the_host_and_no_parameter():
    block, x = _mlp(), torch.randn(4, 16, requires_grad=True)
    with SavedTensorCounter(exclude=block.parameters()) as counter:
        block(x)
    (wrapper,) = offload_blocks(nn.Sequential(block), ["0"], host=COPYING_HOST)
    packed = []
    pack = wrapper.pack
    wrapper.pack = lambda tensor: packed.append(pack(tensor)) or packed[-1]  # type: ignore[method-assign]
    block(x)
    moved = [item for item in packed if isinstance(item, tuple)]
    kept = [item for item in packed if not isinstance(item, tuple)]
    assert wrapper.moved_bytes == counter.stats.activation_bytes > 0
    parameters = {storage_id(p) for p in block.parameters()}
    assert kept and {storage_id(t) for t in kept} <= parameters  # only parameters (or views of them) stay
    assert {copy.untyped_storage().data_ptr() for _, copy, _ in moved}.isdisjoint(
        {p.untyped_storage().data_ptr() for p in block.parameters()}
    )


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_offload_changes_nothing_computed(build):
    """Same state-dict keys, same losses and gradients (dropout included: BERT trains with it)."""
    model, batch = build(3)
    keys = list(model.state_dict())

    loss, grads = loss_and_grads(model, batch)
    names = [name for name, _ in blocks_of(model)][:2]
    wrappers = offload_blocks(model, names, host=COPYING_HOST)
    offloaded_loss, offloaded_grads = loss_and_grads(model, batch)
    assert all(wrapper.moved_bytes > 0 for wrapper in wrappers)
    assert list(model.state_dict()) == keys
    assert torch.equal(offloaded_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, **IDENTICAL, msg=name)
    assert [is_offloaded(m) for _, m in blocks_of(model)] == [True, True, False]
    for wrapper in wrappers:
        del wrapper.module.forward
    assert not any(is_offloaded(m) for _, m in blocks_of(model))
    assert torch.equal(loss_and_grads(model, batch)[0], loss)


def test_a_block_is_either_checkpointed_or_offloaded():
    model, _ = _llama(2)
    first, second = (name for name, _ in blocks_of(model))
    checkpoint_blocks(model, [first])
    offload_blocks(model, [second])
    with pytest.raises(ValueError, match="either checkpointed or offloaded"):
        offload_blocks(model, [first])
    with pytest.raises(ValueError, match="either checkpointed or offloaded"):
        checkpoint_blocks(model, [second])


def test_the_simulation_counts_offloaded_saved_tensors_off_the_device():
    model, batch = _llama()
    simulation = StepSimulation(model, batch, precision="bf16-mixed")
    names = tuple(name for name, _ in blocks_of(model))
    plain, offloaded = simulation.measure(), simulation.measure(offloaded=names)
    with SavedTensorCounter(exclude=simulation.model.parameters()) as counter, simulation.mode, simulation.autocast():
        simulation.step_fn(simulation.model, simulation.inputs)
    assert offloaded.offloaded_bytes >= counter.stats.activation_bytes * 0.9  # the blocks save most of the step's
    assert offloaded.parts["activations"] < plain.parts["activations"] // 100
    assert offloaded.peak_bytes < simulation.measure(names).peak_bytes < plain.peak_bytes
    assert offloaded.offloaded == names and "offloaded blocks: 4" in str(offloaded)
    assert SIMULATED_HOST.type not in plain.device


def test_the_planner_offloads_only_when_asked_and_where_it_pays():
    model, batch = _llama()
    simulation = StepSimulation(model, batch)
    names = tuple(name for name, _ in blocks_of(model))
    budget = (simulation.measure().peak_bytes + simulation.measure(names).peak_bytes) // 2
    assert plan_checkpointing(model, batch, budget).offloaded == ()
    assert plan_checkpointing(model, batch, budget, offload=SLOW_LINK, device="cuda").offloaded == ()
    on_cpu = plan_checkpointing(model, batch, budget, offload=FAST_LINK)
    assert on_cpu.offloaded == () and "training runs on the host" in str(on_cpu)
    plan = plan_checkpointing(model, batch, budget, offload=FAST_LINK, device="cuda")
    assert plan.offloaded == plan.blocks and plan.checkpointed == () and plan.recompute_flops == 0
    assert plan.after.peak_bytes <= budget < plan.one_fewer_peak_bytes
    assert plan.transfer_bytes == 2 * plan.after.offloaded_bytes > 0
    assert "offloading the saved tensors of" in str(plan) and "moved per step" in str(plan)


def test_apply_plan_offloads_the_planned_blocks():
    model, batch = _llama()
    none = StepSimulation(model, batch).measure().peak_bytes
    plan = plan_checkpointing(model, batch, none - 1, offload=True, device="cuda:0")
    forced = plan_checkpointing(model, batch, none - 1, offload=FAST_LINK, device="cuda:0")
    keys = list(model.state_dict())
    apply_plan(model, forced)
    assert [name for name, m in blocks_of(model) if is_offloaded(m)] == sorted(forced.offloaded)
    assert not any(is_checkpointed(m) for _, m in blocks_of(model)) and list(model.state_dict()) == keys
    assert plan.offloaded == ()  # at the default rates, recomputing these tiny blocks is cheaper


def test_an_impossible_budget_says_the_smallest_peak_with_offload_counted():
    model, batch = _llama(2)
    names = tuple(name for name, _ in blocks_of(model))
    every = StepSimulation(model, batch).measure(offloaded=names).peak_bytes
    with pytest.raises(ValueError, match=rf"all 2 blocks checkpointed or offloaded \(2 offloaded\), is .*\({every} bytes\)"):
        plan_checkpointing(model, batch, 1024, offload=FAST_LINK, device="cuda")


def test_offload_costs_must_be_positive():
    with pytest.raises(ValueError, match="positive rates"):
        OffloadCost(host_bandwidth=0)
