"""Activation checkpointing of chosen blocks, without changing the module tree or state-dict keys.

A checkpointed block keeps its class, children and parameters; only its instance gets a
``forward`` attribute that runs the class's forward under non-reentrant
:func:`torch.utils.checkpoint.checkpoint` (saves the block's inputs, recomputes the rest in
backward, RNG state preserved so dropout draws the same masks). ``del block.forward`` undoes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedForward:
    """A block's forward run under non-reentrant activation checkpointing (when grad is enabled)."""

    def __init__(self, forward: Any) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model``: the children of its largest ``nn.ModuleList``, by name.

    Raises:
        ValueError: when the model has no non-empty ``nn.ModuleList``.

    Example::

        >>> model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
        >>> [name for name, _ in blocks_of(model)]
        ['0.0', '0.1', '0.2']
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks, so there is nothing to checkpoint block by block."
        )
    name, blocks = max(lists, key=lambda item: len(item[1]))  # the first of the longest
    return [(f"{name}.{index}" if name else str(index), block) for index, block in enumerate(blocks)]


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), CheckpointedForward)


def checkpoint_blocks(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """Make the named modules of ``model`` recompute their forward in backward; return them.

    Raises:
        ValueError: for a name ``model`` does not have, or a module whose ``forward`` is already
            wrapped otherwise (e.g. offloaded).
    """
    modules = dict(model.named_modules())
    done = []
    for name in names:
        if name not in modules:
            raise ValueError(f"{type(model).__name__} has no module {name!r} to checkpoint.")
        module = modules[name]
        if not is_checkpointed(module):
            if "forward" in vars(module):
                raise ValueError(f"{name!r} already has its own forward (e.g. it is offloaded); a block is either "
                                 "checkpointed or offloaded.")
            module.forward = CheckpointedForward(module.forward)  # type: ignore[method-assign]
        done.append(module)
    return done


def uncheckpoint(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        if is_checkpointed(module):
            del module.forward


@contextmanager
def checkpointed_blocks(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """The named modules checkpointed inside the block only (those that were already stay so)."""
    modules = dict(model.named_modules())
    added = [modules[name] for name in names if name in modules and not is_checkpointed(modules[name])]
    checkpoint_blocks(model, names)
    try:
        yield
    finally:
        uncheckpoint(added)
