"""Step tables: where the thresholds of the step derivative lie and what level each interval gets.

A table with ``bits = k`` splits the real line into ``2**k`` intervals with ``2**k - 1``
ascending thresholds. An element's *code* is the number of thresholds strictly below it; the
backward pass multiplies the incoming gradient by ``levels[code]``.

Two families ship:

- ``"paper"``: the published ReGELU2 / ReSiLU2 coefficients (2 bits, GELU-erf and SiLU). They
  were chosen to make the *antiderivative* of the step function close to the activation over
  the whole real line.
- ``"fitted"``: for every activation and ``bits`` in {1, 2, 4}, the step function closest to
  the exact derivative in expected squared error under the pre-activation distribution
  described in :mod:`lightning_approxbp.tables.solver`. Regenerate them with
  ``python -m lightning_approxbp.tables``.

Example::

    >>> from lightning_approxbp.tables import get_table
    >>> table = get_table("gelu", bits=2)
    >>> table.bits, len(table.thresholds), len(table.levels)
    (2, 3, 4)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib import resources

from lightning_approxbp.activations import ACTIVATIONS

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 4)
TABLE_KINDS: tuple[str, ...] = ("fitted", "paper")
FITTED_TABLES_FILE = "fitted.json"


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", float(value)))[0]


@dataclass(frozen=True)
class StepTable:
    """Thresholds and derivative levels of one step-derivative activation.

    Args:
        activation: the exact forward function, one of ``"gelu"``, ``"gelu_tanh"``, ``"silu"``,
            ``"quick_gelu"``.
        bits: bits stored per element; 1, 2 or 4 (codes pack ``8 // bits`` to a byte).
        thresholds: ``2**bits - 1`` strictly ascending finite values.
        levels: ``2**bits`` derivative values, one per interval.
        kind: where the numbers come from (``"fitted"``, ``"paper"`` or ``"custom"``).

    Raises:
        ValueError: if the sizes do not match ``bits`` or the thresholds are not ascending.
    """

    activation: str
    bits: int
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]
    kind: str = "custom"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {self.activation!r}; expected one of {ACTIVATIONS}.")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} (codes are packed into bytes), got {self.bits}.")
        # Thresholds are kept fp32-representable so that comparing an fp32/fp16/bf16 input in
        # fp32 (kernels) and in fp64 (references) gives the same code.
        object.__setattr__(self, "thresholds", tuple(_to_float32(t) for t in self.thresholds))
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        n_intervals = 2**self.bits
        if len(self.thresholds) != n_intervals - 1 or len(self.levels) != n_intervals:
            raise ValueError(
                f"A {self.bits}-bit table needs {n_intervals - 1} thresholds and {n_intervals} levels, "
                f"got {len(self.thresholds)} and {len(self.levels)}."
            )
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"Thresholds must be strictly ascending, got {self.thresholds}.")

    @classmethod
    def from_relu_sum(cls, activation: str, a: list[float], c: list[float], kind: str = "custom") -> StepTable:
        """Build a table from the paper's parametrisation ``sum_i a_i * max(x - c_i, 0)``.

        The derivative of that sum is a step function whose level above ``c_j`` is
        ``a_1 + ... + a_j``, and 0 below ``c_1``.
        """
        if len(a) != len(c):
            raise ValueError(f"a and c must have the same length, got {len(a)} and {len(c)}.")
        order = sorted(range(len(c)), key=lambda i: c[i])
        levels = [0.0]
        for i in order:
            levels.append(levels[-1] + a[i])
        bits = len(levels).bit_length() - 1
        return cls(activation, bits, tuple(c[i] for i in order), tuple(levels), kind)


# Yang et al., ICML 2024, Table of coefficients for k = 2 (ReGELU2, ReSiLU2).
_PAPER_TABLES: dict[str, StepTable] = {
    "gelu": StepTable.from_relu_sum(
        "gelu",
        a=[-0.04922261145617846, 1.0979632065417297, -0.048740595085551286],
        c=[-3.1858810036855245, -0.001178821281161997, 3.190832613414926],
        kind="paper",
    ),
    "silu": StepTable.from_relu_sum(
        "silu",
        a=[-0.04060357190528599, 1.080925428529668, -0.040321856624382146],
        c=[-6.3050461001646445, -0.0008684942046214787, 6.325815242089708],
        kind="paper",
    ),
}


def _load_fitted_tables() -> dict[tuple[str, int], StepTable]:
    text = resources.files(__package__).joinpath(FITTED_TABLES_FILE).read_text()
    tables = {}
    for entry in json.loads(text)["tables"]:
        table = StepTable(entry["activation"], entry["bits"], tuple(entry["thresholds"]), tuple(entry["levels"]), "fitted")
        tables[(table.activation, table.bits)] = table
    return tables


# Loaded once at import (a few hundred bytes) so that looking a table up is a dict access,
# which torch.compile traces without graph breaks.
_FITTED_TABLES = _load_fitted_tables()


def has_table(activation: str, bits: int = 2, kind: str = "fitted") -> bool:
    """Whether :func:`get_table` ships a table for these arguments."""
    if kind == "paper":
        return activation in _PAPER_TABLES and bits == 2
    return kind == "fitted" and (activation, bits) in _FITTED_TABLES


def get_table(activation: str, bits: int = 2, kind: str = "fitted") -> StepTable:
    """Return a shipped table.

    Args:
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        bits: 1, 2 or 4.
        kind: ``"fitted"`` (default; best gradient fidelity) or ``"paper"`` (published
            ReGELU2/ReSiLU2 coefficients, 2 bits, GELU and SiLU only).

    Raises:
        ValueError: for an unknown activation or kind, or a combination that does not ship.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    if kind == "paper":
        if activation not in _PAPER_TABLES or bits != 2:
            raise ValueError(
                f"The paper publishes 2-bit tables for {sorted(_PAPER_TABLES)} only; "
                f"got activation={activation!r}, bits={bits}. Use kind='fitted' for other cases."
            )
        return _PAPER_TABLES[activation]
    if kind == "fitted":
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
        return _FITTED_TABLES[(activation, bits)]
    raise ValueError(f"Unknown table kind {kind!r}; expected one of {TABLE_KINDS}.")


__all__ = ["SUPPORTED_BITS", "TABLE_KINDS", "StepTable", "get_table", "has_table"]
