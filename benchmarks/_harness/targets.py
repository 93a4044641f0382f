"""A target a benchmark measures, as one row of the README's target table.

Each benchmark declares its targets beside the measurement (``readme_targets(payload)``);
``make_readme_results.py`` only lists the benchmarks, in README order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .render import table

HEADER = ("target (issues 5, 9, 10)", "measured", "machine", "verdict")


@dataclass(frozen=True)
class TargetRow:
    """What was promised, the figure measured, where, and whether it holds (``None``: not measured)."""

    target: str
    measured: str = "-"
    machine: str = "-"
    met: bool | None = None

    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "**not met**")


def target_table(rows: list[TargetRow]) -> list[str]:
    return table(HEADER, [(r.target, r.measured, r.machine, r.verdict()) for r in rows])

