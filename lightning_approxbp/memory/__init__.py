"""Whole-step memory without a GPU: a simulated estimate and a checkpointing planner for a budget.

Plain PyTorch (no Lightning):

- :func:`estimate_step_memory`: the peak of one training step (parameters, gradients, optimizer
  state, activations, temporaries) replayed on fake tensors, for the model as it is or converted;
- :func:`plan_checkpointing` / :func:`apply_plan`: the fewest blocks to checkpoint (or, with
  ``offload``, to keep their saved tensors in host memory) so the simulated peak fits a budget
  (bytes, ``"20GiB"`` or a fraction of the device's memory);
- :func:`offload_blocks`: saved-tensor offload of chosen blocks to (pinned) host memory.
"""

from lightning_approxbp.memory.budget import device_memory, parse_budget, read_budget
from lightning_approxbp.memory.checkpointing import (
    blocks_of,
    checkpoint_blocks,
    is_checkpointed,
)
from lightning_approxbp.memory.estimate import (
    StepMemoryEstimate,
    StepSimulation,
    estimate_step_memory,
    format_bytes,
)
from lightning_approxbp.memory.offload import is_offloaded, offload_blocks
from lightning_approxbp.memory.planner import (
    CheckpointPlan,
    OffloadCost,
    apply_plan,
    plan_checkpointing,
)

__all__ = [
    "CheckpointPlan",
    "OffloadCost",
    "StepMemoryEstimate",
    "StepSimulation",
    "apply_plan",
    "blocks_of",
    "checkpoint_blocks",
    "device_memory",
    "estimate_step_memory",
    "format_bytes",
    "is_checkpointed",
    "is_offloaded",
    "offload_blocks",
    "parse_budget",
    "plan_checkpointing",
    "read_budget",
]
