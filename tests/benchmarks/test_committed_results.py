"""Every committed result Markdown is its committed JSON rendered by its script, byte for byte.

Each benchmark renders its Markdown from the payload alone (``render``), so a change to a renderer
that would alter a committed table fails here rather than unnoticed on the next run.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"
# Scripts whose committed results are under benchmarks/results (ops: the CPU run; its GPU run is gpu_all's).
SCRIPTS = {
    "activation_memory": "activation_memory_cpu", "conversion_cost": "conversion_cost_cpu",
    "finetune_parity": "finetune_parity_cpu", "gradient_fidelity": "gradient_fidelity_cpu",
    "kernel_compile": "kernel_compile", "linear_cross_entropy": "linear_cross_entropy_cpu", "main_job": "main_job_cpu",
    "main_job_memory": "main_job_memory_cpu", "ops": "ops_cpu", "peak_memory": "peak_memory_sim",
    "precision_plugin": "precision_plugin_cpu", "speed_cpu": "speed_cpu",
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_committed_markdown_renders_from_committed_json(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    name = SCRIPTS[script]
    if not (RESULTS / f"{name}.json").exists():
        pytest.skip(f"no committed {name}.json")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their helpers as top-level modules
    sys.modules.pop(script, None)  # not a same-named module imported before (``ops``: tests/ops)
    try:
        render = importlib.import_module(script).render
        assert render(json.loads((RESULTS / f"{name}.json").read_text())) == (RESULTS / f"{name}.md").read_text()
    finally:
        sys.modules.pop(script, None)
