"""Result files as the README reads them: a full run's JSON payload, or nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_full_run(results: Path, name: str) -> dict[str, Any] | None:
    """The payload of ``results/name``; ``None`` when absent or a short run (``--quick``/``--smoke``),
    whose toy figures are no results."""
    path = results / name
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return None if data.get("quick") or data.get("smoke") else data
