"""Activation checkpointing of chosen blocks, without changing the module tree or state-dict keys.

A checkpointed block keeps its class, children and parameters; only its instance gets a
``forward`` attribute that runs the class's forward under non-reentrant
:func:`torch.utils.checkpoint.checkpoint` (saves the block's inputs, recomputes the rest in
backward, RNG state preserved so dropout draws the same masks). ``del block.forward`` undoes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    return wrap_forwards(model, names, CheckpointedForward, _checkpointed, "checkpoint")


@contextmanager
def checkpointed_blocks(model: nn.Module, names: Iterable[str]) -> Iterator[list[nn.Module]]:
    """The named modules checkpointed inside the block only (those that were already stay so)."""
    with wrapped_forwards(model, names, CheckpointedForward, _checkpointed, "checkpoint") as modules:
        yield modules


def _checkpointed(module: nn.Module) -> CheckpointedForward:
    return CheckpointedForward(module.forward)


def wrap_forwards(
    model: nn.Module, names: Iterable[str], kind: type, make: Callable[[nn.Module], Any], verb: str
) -> list[nn.Module]:
    """Give each named module of ``model`` the instance ``forward`` ``make(module)`` (of type ``kind``)
    unless it has one of that type already; return the modules.

    One instance ``forward`` per module: a block is either checkpointed or offloaded.

    Raises:
        ValueError: for a name ``model`` does not have (the message says what could not be
            ``verb``-ed), or a module whose ``forward`` is already wrapped otherwise.
    """
    modules = dict(model.named_modules())
    done = []
    for name in names:
        if name not in modules:
            raise ValueError(f"{type(model).__name__} has no module {name!r} to {verb}.")
        module = modules[name]
        own = vars(module).get("forward")
        if own is None:
            module.forward = make(module)  # type: ignore[method-assign]
        elif not isinstance(own, kind):
            raise ValueError(
                f"{name!r} already has its own forward ({type(own).__name__}); a block is either checkpointed or "
                "offloaded."
            )
        done.append(module)
    return done


@contextmanager
def wrapped_forwards(
    model: nn.Module, names: Iterable[str], kind: type, make: Callable[[nn.Module], Any], verb: str
) -> Iterator[list[nn.Module]]:
    """:func:`wrap_forwards` inside the block only: the forwards it added are removed on exit."""
    modules = dict(model.named_modules())
    names = list(names)
    added = [modules[name] for name in names if name in modules and "forward" not in vars(modules[name])]
    try:
        yield wrap_forwards(model, names, kind, make, verb)
    finally:
        for module in added:
            vars(module).pop("forward", None)  # absent when wrapping stopped at an error before it
