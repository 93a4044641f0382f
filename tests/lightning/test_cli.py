"""The ``lightning``/``approxbp`` command: LightningCLI with short names, config lookup,
hand-over to lightning-sdk, ``python -m lightning_approxbp``."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_approxbp import cli

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": "lightning_logs", "name": "tiny"}},
        "callbacks": [{"class_path": "PeakMemoryMonitor"}],
        "plugins": [{"class_path": "ApproxBPPrecision", "init_args": {"precision": "bf16-mixed"}}],
    },
    "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
    "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
}


@pytest.fixture(autouse=True)
def _program_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning"])  # not pytest's arguments


@pytest.fixture
def tiny_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


def test_fit_with_short_names_twice_in_the_same_dir(tiny_config: Path) -> None:
    for _ in range(2):  # the second run overwrites the saved config.yaml instead of failing
        cli.main(["fit", "--config", str(tiny_config)])
    metrics = sorted(Path("lightning_logs/tiny").glob("version_*/metrics.csv"))
    assert len(metrics) == 2
    assert "peak_memory/saved_activation_bytes" in metrics[-1].read_text()


def test_short_names_resolve(tiny_config: Path) -> None:
    parsed = cli.cli(["--config", str(tiny_config)], run=False)
    from lightning_approxbp.callbacks.peak_memory import PeakMemoryMonitor
    from lightning_approxbp.plugins import ApproxBPPrecision

    assert any(isinstance(c, PeakMemoryMonitor) for c in parsed.trainer.callbacks)
    assert isinstance(parsed.trainer.precision_plugin, ApproxBPPrecision)


def test_config_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.find_config("approxbp.yaml") == str(REPO / "configs" / "approxbp.yaml")
    assert cli.find_config("approxbp") == str(REPO / "configs" / "approxbp.yaml")
    assert cli.find_config("configs/baseline.yaml") == str(REPO / "configs" / "baseline.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "approxbp.yaml").write_text("{}")
    assert cli.find_config("approxbp.yaml") == str(tmp_path / "configs" / "approxbp.yaml")
    assert cli.resolve_config_paths(["fit", "-c=approxbp", "--config", "missing.yaml"]) == [
        "fit", f"-c={tmp_path / 'configs' / 'approxbp.yaml'}", "--config", "missing.yaml",
    ]
    assert cli.find_config("{trainer: {max_epochs: 1}}") == "{trainer: {max_epochs: 1}}"


class _FakeEntryPoint:
    group, name = "console_scripts", "lightning"

    def __init__(self, calls: list[list[str]]) -> None:
        self.calls = calls

    def load(self):  # noqa: ANN201
        return lambda: self.calls.append(list(sys.argv)) or 0


class _FakeDistribution:
    def __init__(self, entry_points: list[object]) -> None:
        self.entry_points = entry_points


def test_other_commands_go_to_lightning_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def distribution(name: str) -> _FakeDistribution:
        assert name == "lightning-sdk"
        return _FakeDistribution([_FakeEntryPoint(calls)])

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert cli.main(["login", "--key", "x"]) == 0
    assert calls == [["lightning", "login", "--key", "x"]]
    with pytest.raises(SystemExit):  # fit stays here, and has no model
        cli.main(["fit", "--trainer.max_epochs=1"])
    assert len(calls) == 1


def test_without_lightning_sdk_unknown_commands_are_parse_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["login"])
    assert "login" in capsys.readouterr().err


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_python_m_runs_the_main_config_fast_dev_run(tmp_path: Path) -> None:
    result = _run(sys.executable, "-m", "lightning_approxbp", "fit", "--config", "approxbp.yaml",
                  "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "converted" in output and "saved for backward on the probe batch" in output  # the conversion report


@pytest.mark.skipif(shutil.which("approxbp") is None, reason="console scripts not installed (pip install -e .)")
def test_console_script_help(tmp_path: Path) -> None:
    result = _run("approxbp", "fit", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_a_misspelled_option_gets_a_short_error_with_the_closest_options(
    tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(tiny_config), "--trainer.max_epohcs=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.max_epohcs=1" in err
    assert "did you mean --trainer.max_epochs" in err
    assert len(err.strip().splitlines()) <= 5  # not the ~50-line usage dump


def test_only_the_recipes_a_config_names_are_imported() -> None:
    config = REPO / "configs" / "approxbp.yaml"
    assert cli.recipe_modules_named_in(["fit", "--config", str(config)]) == [
        "lightning_approxbp.recipes.text_classification"
    ]
    assert cli.recipe_modules_named_in(["fit", "--model", "BoringModel"]) == []


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("ApproxBP", "bits", 3, ["bits=3 is not accepted", "1, 2, 4"]),
        ("ApproxBP", "table", "nonsense", ["table='nonsense' is not accepted", "'fitted', 'paper'"]),
        ("ApproxBP", "affine", "wrong", ["affine='wrong' is not accepted", "'auto', 'merge', 'keep'"]),
        ("ApproxBP", "table", "fited", ["Did you mean 'fitted'?"]),
        ("ApproxBPPrecision", "precision", "bf17", ["precision='bf17' is not accepted", "'bf16-mixed'",
                                                    "Did you mean 'bf16'?"]),
        ("ApproxBP", "bitz", 2, ["ApproxBP has no option 'bitz' (in trainer.callbacks)", "Did you mean 'bits'?"]),
    ],
)
def test_a_bad_value_or_key_gets_one_short_message_without_a_traceback(
    section: str, key: str, value: object, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_ENV_VAR, raising=False)
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["trainer"]["callbacks"].append({"class_path": "ApproxBP", "init_args": {}})
    entries = config["trainer"]["callbacks"] + config["trainer"]["plugins"]
    next(e for e in entries if e["class_path"] == section)["init_args"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 10, err


def test_debug_shows_the_traceback(tiny_config: Path) -> None:
    config = yaml.safe_load(tiny_config.read_text())
    config["trainer"]["callbacks"].append({"class_path": "ApproxBP", "init_args": {"bits": 3}})
    tiny_config.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="bits=3 is not accepted"):
        cli.main(["fit", "--config", str(tiny_config), "--debug"])
