"""What a conversion changed, why, and what it saved.

Example::

    >>> report = ConversionReport(probe="example_input", bytes_before=1000, bytes_after=600)
    >>> report.add("mlp.act", "GELU", "converted", "step gelu 2-bit fitted")
    >>> report.reduction
    0.4
    >>> print(report)
    ApproxBP conversion (probe: example_input)
    module   kind  action     strategy                reason
    -------  ----  ---------  ----------------------  ------
    mlp.act  GELU  converted  step gelu 2-bit fitted
    saved for backward on the probe batch: 1,000 B -> 600 B (-40.0%)
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("converted", "skipped", "unchanged")
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fqn", "module"), ("kind", "kind"), ("action", "action"), ("strategy", "strategy"), ("reason", "reason")
)
# Long reasons wrap onto continuation lines (never cut): the whole reason is the point.
_REASON_WIDTH = 90


@dataclass
class ReportRow:
    """One module: its name, class (and what it was recognised as), what happened, and why.

    ``action`` is ``"converted"``, ``"skipped"`` (left as it was, ``reason`` says why) or
    ``"unchanged"`` (already converted by an earlier call).
    """

    fqn: str
    kind: str
    action: str
    strategy: str = ""
    reason: str = ""


@dataclass
class ConversionReport:
    """The outcome of :func:`~lightning_approxbp.conversion.convert`.

    Attributes:
        rows: one per converted, skipped or already-converted module, in model order.
        probe: how the probe batch was obtained (``"none"`` if there was none).
        bytes_before, bytes_after: bytes saved for backward by one probe forward, counted by
            :class:`~lightning_approxbp.saved_tensors.SavedTensorCounter` (parameters excluded)
            on the original and on the converted model; ``None`` without a probe.
        max_error: largest relative output difference found by verification (``None`` if not run).
        notes: anything else worth knowing (e.g. why consumers could not be traced).
    """

    rows: list[ReportRow] = field(default_factory=list)
    probe: str = "none"
    bytes_before: int | None = None
    bytes_after: int | None = None
    max_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, fqn: str, kind: str, action: str, strategy: str = "", reason: str = "") -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}.")
        self.rows.append(ReportRow(fqn, kind, action, strategy, reason))

    @property
    def converted(self) -> list[ReportRow]:
        return [row for row in self.rows if row.action == "converted"]

    @property
    def changed(self) -> bool:
        """Whether this call changed the model."""
        return bool(self.converted)

    @property
    def reduction(self) -> float | None:
        """Fraction of saved-for-backward bytes removed on the probe batch."""
        if not self.bytes_before or self.bytes_after is None:
            return None
        return 1.0 - self.bytes_after / self.bytes_before

    def row(self, fqn: str) -> ReportRow:
        """The row of module ``fqn``; ``KeyError`` if the module is not in the report."""
        for row in self.rows:
            if row.fqn == fqn:
                return row
        raise KeyError(fqn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "reduction": self.reduction,
            "max_error": self.max_error,
            "notes": list(self.notes),
            "rows": [asdict(row) for row in self.rows],
        }

    def __str__(self) -> str:
        table = [[h for _, h in _COLUMNS]]
        for row in self.rows:
            cells = [str(getattr(row, key)) for key, _ in _COLUMNS]
            reason_lines = textwrap.wrap(cells[-1], _REASON_WIDTH, break_long_words=False) or [""]
            table.append([*cells[:-1], reason_lines[0]])
            table.extend([*([""] * (len(cells) - 1)), line] for line in reason_lines[1:])
        widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
        lines = [f"ApproxBP conversion (probe: {self.probe})"]
        for index, line in enumerate(table):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        counts = {a: sum(r.action == a for r in self.rows) for a in ACTIONS}
        if len(self.rows) > 1:
            lines.append(", ".join(f"{n} {a}" for a, n in counts.items() if n))
        if self.bytes_before is not None and self.bytes_after is not None:
            change = -100.0 * (self.reduction or 0.0)
            lines.append(
                f"saved for backward on the probe batch: {self.bytes_before:,} B -> {self.bytes_after:,} B ({change:+.1f}%)"
            )
        if self.max_error is not None:
            lines.append(f"verified: max relative output difference {self.max_error:.2e}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
