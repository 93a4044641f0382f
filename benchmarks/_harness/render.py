"""Markdown for the result files and the README: tables and sections, written one way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row (cells as ``str`` gives them)."""
    return [row_line(header), "|" + "---|" * len(header), *(row_line(row) for row in rows)]


def row_line(cells: Sequence[object]) -> str:
    """One table line; an empty cell is one space wide (``| |``), as the README has always shown it."""
    return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"


def section(title: str, *paragraphs: str) -> list[str]:
    """A ``##`` heading and paragraphs, each followed by a blank line."""
    lines = [f"## {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def document(lines: Iterable[str]) -> str:
    """Lines joined into one file's text, ending in exactly one newline."""
    return "\n".join(lines).rstrip("\n") + "\n"
