"""Find modules and swap them in place, remembering how to undo the swap.

A module may be reachable under several names (shared submodules); every place that holds it
is replaced, so the model never mixes converted and unconverted copies of one module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass
class Site:
    """One module and every ``(parent, attribute)`` pair that holds it.

    Attributes:
        fqn: the first fully qualified name under which the module is reached.
        module: the module itself.
        holders: the parents and attribute names that refer to it (empty for the root).
    """

    fqn: str
    module: nn.Module
    holders: list[tuple[nn.Module, str]] = field(default_factory=list)


def sites(root: nn.Module) -> Iterator[Site]:
    """Every unique module under ``root`` (root included, first), in registration order."""
    found = {id(module): Site(name, module) for name, module in root.named_modules()}
    for parent in found.values():
        # ``_modules``, not ``named_children()``, which lists a child held twice by one parent once
        for name, child in parent.module._modules.items():
            if child is not None:
                found[id(child)].holders.append((parent.module, name))
    yield from found.values()


@dataclass
class Swap:
    """An attribute of ``parent`` changed from ``old`` to ``new``; :meth:`undo` puts it back."""

    parent: nn.Module
    name: str
    old: Any
    new: Any

    def undo(self) -> None:
        if not isinstance(self.old, nn.Module):
            delattr(self.parent, self.name)  # a child module cannot be overwritten by a plain attribute
        setattr(self.parent, self.name, self.old)


class SwapLog:
    """Applies replacements and can undo all of them, last first.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.GELU())
        >>> log = SwapLog()
        >>> log.replace_attribute(model, "0", nn.SiLU())
        >>> model[0]
        SiLU()
        >>> log.undo_all()
        >>> model[0]
        GELU(approximate='none')
    """

    def __init__(self) -> None:
        self.swaps: list[Swap] = []

    def replace_attribute(self, parent: nn.Module, name: str, new: Any) -> None:
        old = getattr(parent, name)
        setattr(parent, name, new)  # keeps the child's position in ``_modules`` (order matters in Sequential)
        self.swaps.append(Swap(parent, name, old, new))

    def replace_site(self, site: Site, new: nn.Module) -> None:
        for parent, name in site.holders:
            self.replace_attribute(parent, name, new)

    def undo_all(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()
        self.swaps.clear()
