"""The README's self-contained Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# Snippets that need the user's own model and datamodule are shown, not run.
RUNNABLE = [s for s in SNIPPETS if "datamodule" not in s]


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.splitlines()[-1][:40])
def test_snippet_runs(snippet, capsys):
    exec(compile(snippet, str(README), "exec"), {})
