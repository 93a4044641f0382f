"""Find modules already sharded by FSDP or tensor parallelism: converting them would break them.

FSDP1, FSDP2 (``fully_shard``) and tensor parallelism keep (module, parameter name) pairs and swap
parameters in and out around each forward, so a module replaced after sharding keeps the sharded
parameter while the sharding machinery updates the old module. Conversion must come first.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor


def sharded_modules(root: nn.Module) -> list[str]:
    """Names of the modules of ``root`` managed by FSDP or holding tensor-parallel parameters."""
    return [
        name or type(root).__name__
        for name, module in root.named_modules()
        if isinstance(module, (FSDPModule, FullyShardedDataParallel))
        or any(isinstance(p, DTensor) for p in module.parameters(recurse=False))
    ]


def describe(names: list[str]) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
