"""Markdown for the result files and the README: tables and sections, written one way."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]], right_aligned: Collection[str] = ()) -> list[str]:
    """A Markdown table: the header, its rule, one line per row (cells as ``str`` gives them).

    The columns named in ``right_aligned`` are right-aligned (numbers to compare down a column).
    """
    rule = "|" + "".join("---:|" if name in right_aligned else "---|" for name in header)
    return [_row_line(header), rule, *(_row_line(row) for row in rows)]


def _row_line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def section(title: str, *paragraphs: str) -> list[str]:
    """A ``##`` heading and paragraphs, each followed by a blank line."""
    lines = [f"## {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def document(lines: Iterable[str]) -> str:
    """Lines joined into one file's text, ending in exactly one newline."""
    return "\n".join(lines).rstrip("\n") + "\n"
