"""A Triton kernel launch described as data before it runs.

The launchers (``*_triton.py``) build a :class:`KernelLaunch` and run it. The ahead-of-time
compile check (:mod:`lightning_approxbp.ops.aot_compile`) calls the same launchers on meta
tensors and compiles what they would launch, so the set of compiled specialisations comes from
the launch code itself, not from a hand-kept list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelLaunch:
    """One launch: the kernel, its grid, runtime arguments, compile-time switches and warps."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)
