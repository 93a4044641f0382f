"""The step and optimizer of a LightningModule, usable on a fake copy (no Lightning import needed).

A copy has no Trainer: ``self.log`` is made a no-op, and ``configure_optimizers`` may fail
when it reads Trainer state; AdamW then stands in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """``module.training_step(batch, 0)``'s loss, with logging switched off."""
    module.log = module.log_dict = _ignore  # type: ignore[method-assign]
    output = module.training_step(batch, 0)
    return output["loss"] if isinstance(output, dict) else output


def configured_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    """The first optimizer of ``module.configure_optimizers()``; AdamW when there is none or it fails."""
    try:
        config = module.configure_optimizers()
    except Exception:  # noqa: BLE001 - e.g. it reads trainer state that does not exist outside fit
        config = None
    while isinstance(config, (list, tuple, dict)) and config:
        config = config.get("optimizer") if isinstance(config, dict) else config[0]
    if isinstance(config, torch.optim.Optimizer):
        return config
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
