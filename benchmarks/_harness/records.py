"""Result files, written one way (a run's JSON payload and its Markdown) and read back by the README."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

Payload = dict[str, Any]


def arguments(doc: str, short_help: str, short: str = "quick") -> argparse.ArgumentParser:
    """A benchmark's command line: described by its docstring's first line, with its short mode and ``--out``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(f"--{short}", action="store_true", help=short_help)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR}; none with --{short})")
    return parser


def out_folder(out: Path | None, short: bool) -> Path | None:
    """``--out``, else results/ for a full run; a short run's toy figures are written only where asked."""
    return out if out is not None else (None if short else RESULTS_DIR)


def publish(name: str, payload: Payload, render: Callable[[Payload], str], out: Path | None) -> None:
    """Print the payload's Markdown and, given a folder, write ``name.json`` and ``name.md`` there.

    The Markdown is rendered from the payload alone, so a committed ``.md`` regenerates from its ``.json``.
    """
    markdown = render(payload)
    print(markdown)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / f"{name}.md").write_text(markdown)
        print(f"wrote {out / name}.json and .md")


def load_full_run(results: Path, name: str) -> Payload | None:
    """The payload of ``results/name.json``; ``None`` when absent or a short run (``--quick``/``--smoke``),
    whose toy figures are no results."""
    path = results / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return None if data.get("quick") or data.get("smoke") else data
