"""Warnings said once per job, not once per process (no Lightning needed)."""

from __future__ import annotations

import warnings

import torch


def warn_rank_zero(message: str, stacklevel: int = 3) -> None:
    """``warnings.warn`` on the first process only, so that a multi-process job says it once."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
