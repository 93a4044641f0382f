"""The README's Python snippets run as written.

Snippets that train need the user's ``model`` and ``datamodule``: they run with a tiny
LightningModule (LayerNorm, Linear, GELU) and datamodule supplied here, and Trainer defaults
shortened through Lightning's ``PL_TRAINER_*`` environment variables (what the snippet itself
says is not changed).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TRAINING = [s for s in SNIPPETS if "datamodule" in s]
SELF_CONTAINED = [s for s in SNIPPETS if "datamodule" not in s]


class TinyClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(LightningDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator))
        return DataLoader(data, batch_size=8)


def test_readme_has_snippets_of_both_kinds():
    assert len(SELF_CONTAINED) >= 2 and len(TRAINING) >= 1


@pytest.mark.parametrize("snippet", SELF_CONTAINED, ids=lambda s: s.splitlines()[-1][:40])
def test_self_contained_snippet_runs(snippet):
    exec(compile(snippet, str(README), "exec"), {})


@pytest.mark.parametrize("snippet", TRAINING, ids=lambda s: s.splitlines()[-1][:40])
def test_training_snippet_runs_and_converts(snippet, tmp_path, monkeypatch, capsys):
    for name, value in {
        "MAX_EPOCHS": "1", "LIMIT_TRAIN_BATCHES": "2", "ENABLE_CHECKPOINTING": "0",
        "ENABLE_PROGRESS_BAR": "0", "LOGGER": "0", "DEFAULT_ROOT_DIR": str(tmp_path), "ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(f"PL_TRAINER_{name}", value)
    namespace = {"model": TinyClassifier(), "datamodule": TinyData()}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["trainer"].global_step == 2
    report = namespace["approxbp"].report
    assert {row.fqn for row in report.converted} == {"net.0", "net.1", "net.2"}
    assert "ApproxBP conversion" in capsys.readouterr().out
