"""Budgets: parsing, the fewest-blocks plan, and that a plan only changes what recomputes."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_approxbp.memory import (
    StepSimulation,
    apply_plan,
    blocks_of,
    checkpoint_blocks,
    device_memory,
    is_checkpointed,
    parse_budget,
    plan_checkpointing,
)
from tests.memory.models import VOCAB, loss_and_grads, tiny_bert, tiny_llama
from tests.tolerances import IDENTICAL

pytestmark = pytest.mark.filterwarnings("ignore:Module is None")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(1024, 1024), ("512MiB", 512 * 2**20), ("20 GiB", 20 * 2**30), ("1.5GB", 1_500_000_000), ("2kib", 2048)],
)
def test_budgets_are_read_as_bytes(budget, expected):
    assert parse_budget(budget) == expected


def test_a_fraction_is_of_the_host_memory_on_cpu():
    assert parse_budget(0.5) == int(0.5 * device_memory(torch.device("cpu")))


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (-5, "must be positive"), (0, "must be positive"), ("0GiB", "must be positive"), (1.5, r"in \(0, 1\]"),
        (-0.1, r"in \(0, 1\]"), ("twenty gigs", "Cannot read the memory budget"), ("20 GiBs", "e.g. '20GiB'"),
    ],
)
def test_bad_budgets_get_clear_errors(budget, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(budget)


@pytest.mark.parametrize("budget", [True, [1], None])
def test_a_budget_of_another_type_is_a_type_error(budget):
    with pytest.raises(TypeError, match="must be bytes, a size string or a fraction"):
        parse_budget(budget)


def _llama(layers: int = 4) -> tuple[torch.nn.Module, dict]:
    model, _ = tiny_llama(layers)
    ids = torch.randint(0, VOCAB, (8, 64))
    return model, {"input_ids": ids, "labels": ids}


def test_the_plan_fits_and_no_plan_with_fewer_blocks_does():
    model, batch = _llama()
    simulation = StepSimulation(model, batch, precision="bf16-mixed")
    names = [name for name, _ in blocks_of(model)]
    none, every = simulation.measure().peak_bytes, simulation.measure(tuple(names)).peak_bytes
    assert every < none
    budget = (none + every) // 2
    plan = plan_checkpointing(model, batch, budget, precision="bf16-mixed")
    assert 0 < len(plan.blocks) < len(names)
    assert plan.after.peak_bytes <= budget < plan.one_fewer_peak_bytes
    assert plan.recompute_flops > 0 and plan.recompute_flops < plan.forward_flops
    for fewer in itertools.combinations(names, len(plan.blocks) - 1):
        assert simulation.measure(fewer).peak_bytes > budget, fewer
    assert "checkpointing" in str(plan) and plan.blocks[0] in str(plan)


def test_a_budget_that_fits_checkpoints_nothing():
    model, batch = _llama(2)
    plan = plan_checkpointing(model, batch, "1TiB")
    assert plan.blocks == () and plan.after is plan.before and "fits without" in str(plan)


def test_an_impossible_budget_says_the_smallest_reachable_peak():
    model, batch = _llama(2)
    every = StepSimulation(model, batch).measure(tuple(name for name, _ in blocks_of(model))).peak_bytes
    with pytest.raises(ValueError, match=rf"cannot be met.*all 2 blocks checkpointed, is .*\({every} bytes\)"):
        plan_checkpointing(model, batch, 1024)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_checkpointing_changes_only_what_recomputes(build):
    """Same state-dict keys, same losses and gradients (dropout included: BERT trains with it)."""
    model, batch = build(3)
    reference = {name: p.detach().clone() for name, p in model.state_dict().items()}
    keys = list(model.state_dict())

    loss, grads = loss_and_grads(model, batch)
    names = [name for name, _ in blocks_of(model)][:2]
    calls = []
    blocks = checkpoint_blocks(model, names)
    handle = next(blocks[0].children()).register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, batch)
    handle.remove()
    assert len(calls) == 2  # the block's forward ran again in backward
    assert list(model.state_dict()) == keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert torch.equal(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, **IDENTICAL, msg=name)
    assert [is_checkpointed(m) for _, m in blocks_of(model)] == [True, True, False]


def test_apply_plan_checkpoints_the_planned_blocks():
    model, batch = _llama()
    none = StepSimulation(model, batch).measure().peak_bytes
    plan = plan_checkpointing(model, batch, none - 1)
    apply_plan(model, plan)
    assert [name for name, m in blocks_of(model) if is_checkpointed(m)] == sorted(plan.blocks)
    assert StepSimulation(model, batch).measure().peak_bytes == plan.after.peak_bytes


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks"):
        blocks_of(torch.nn.Linear(2, 2))
