"""What a conversion changed, why, and what it saved.

Example::

    >>> report = ConversionReport(probe="example_input", bytes_before=1000, bytes_after=600)
    >>> report.add("mlp.act", "GELU", "converted", "step gelu 2-bit fitted")
    >>> report.reduction
    0.4
    >>> report.add("mlp.norm", "LayerNorm", "skipped", reason="output also used by mul in mlp.gate")
    >>> print(report)
    ApproxBP conversion (probe: example_input)
    action     module (kind): strategy; reason on the lines below
    converted  mlp.act (GELU): step gelu 2-bit fitted
    skipped    mlp.norm (LayerNorm)
               output also used by mul in mlp.gate
    1 converted, 1 skipped
    saved for backward on the probe batch: 1,000 B -> 600 B (-40.0%)
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("converted", "skipped", "unchanged")
# The printed report fits a terminal this wide; long names and reasons wrap (never cut: the
# whole reason is the point).
WIDTH = 100
_ACTION_WIDTH = max(len(action) for action in ACTIONS)


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
        seconds: wall time of the conversion (probe runs, checks and swaps); ``None`` if not timed.
    """

    rows: list[ReportRow] = field(default_factory=list)
    probe: str = "none"
    bytes_before: int | None = None
    bytes_after: int | None = None
    max_error: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None

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
            "seconds": self.seconds,
            "rows": [asdict(row) for row in self.rows],
        }

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int = WIDTH) -> str:
        """The report as text, no line longer than ``width`` (unless one word is): per module,
        ``action  module (kind): strategy``, and its reason on the lines below."""
        indent = " " * (_ACTION_WIDTH + 2)
        lines = [f"ApproxBP conversion (probe: {self.probe})",
                 f"{'action':<{_ACTION_WIDTH}}  module (kind): strategy; reason on the lines below"]
        for row in self.rows:
            head = f"{row.action:<{_ACTION_WIDTH}}  {row.fqn} ({row.kind})" + (f": {row.strategy}" if row.strategy else "")
            lines.extend(textwrap.wrap(head, width, subsequent_indent=indent, break_long_words=False,
                                       break_on_hyphens=False))
            if row.reason:
                lines.extend(textwrap.wrap(row.reason, width, initial_indent=indent, subsequent_indent=indent,
                                           break_long_words=False, break_on_hyphens=False))
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
        if self.seconds is not None:
            lines.append(f"conversion took {self.seconds:.2f} s")
        for note in self.notes:
            lines.extend(textwrap.wrap(f"note: {note}", width, subsequent_indent="  ", break_long_words=False))
        return "\n".join(lines)
