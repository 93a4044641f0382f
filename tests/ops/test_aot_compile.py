"""Every launchable kernel compiles for sm_80 and sm_90, without spills, on this GPU-less machine.

The kernels must be imported without ``TRITON_INTERPRET`` (which the CPU test session sets), so
the check runs in subprocesses, the way CI and users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _compiler_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    command = [sys.executable, "-m", "lightning_approxbp.ops.aot_compile", "--arch", "80", "90", "--json", str(out)]
    run = subprocess.run(command, cwd=ROOT, env=_compiler_env(), capture_output=True, text=True, timeout=600)
    return run, json.loads(out.read_text()) if out.exists() else []


def test_every_launchable_kernel_compiles_without_spills(compiled):
    run, results = compiled
    assert run.returncode == 0, run.stderr[-4000:]
    assert results and all(r["error"] is None and r["spill_stores"] == 0 for r in results)


def test_the_check_covers_every_kernel_dtype_and_arch(compiled):
    from lightning_approxbp.ops import (
        gated_mlp_triton,
        linear_cross_entropy_triton,
        ms_norm_triton,
        step_activation_triton,
    )

    _, results = compiled
    kernels = {
        name
        for module in (ms_norm_triton, step_activation_triton, gated_mlp_triton, linear_cross_entropy_triton)
        for name in vars(module)
        if name.endswith("_kernel")
    }
    assert {r["kernel"] for r in results} == kernels
    assert {r["arch"] for r in results} == {80, 90}
    seen = {(r["kernel"], r["dtypes"]) for r in results}
    for dtype in ("fp32", "fp16", "bf16"):
        assert ("_step_activation_fwd_kernel", f"X={dtype} Y={dtype}") in seen
        assert ("_step_activation_bwd_kernel", f"DY={dtype} DX={dtype}") in seen
    # Every row-length class the launcher can pick, up to the looped kernel.
    blocks = {r["config"].split("BLOCK_SIZE=")[1] for r in results if r["kernel"] == "_ms_norm_bwd_kernel"}
    assert blocks == {str(2**p) for p in range(8, 13)}


_BROKEN_KERNELS = '''
import torch
import triton
import triton.language as tl

SCALE = 0.5  # a plain float: the interpreter reads it, the compiler refuses it
SCALE_CONSTEXPR = tl.constexpr(0.5)


@triton.jit
def refused_kernel(X_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(X_ptr + offsets, tl.load(X_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)


@triton.jit
def accepted_kernel(X_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(X_ptr + offsets, tl.load(X_ptr + offsets, mask=offsets < n) * SCALE_CONSTEXPR, mask=offsets < n)
'''


def test_the_check_fails_on_code_only_the_interpreter_accepts(tmp_path):
    (tmp_path / "fixture_kernels.py").write_text(_BROKEN_KERNELS)
    script = textwrap.dedent(
        """
        import torch, fixture_kernels
        from lightning_approxbp.ops.aot_compile import compile_all, failures, spec_for
        from lightning_approxbp.ops.kernel_launch import KernelLaunch

        x = torch.empty(64, device="meta")
        specs = [
            spec_for(KernelLaunch(kernel, (1,), {"X_ptr": x, "n": 64}, {"BLOCK": 64}, num_warps=1))
            for kernel in (fixture_kernels.refused_kernel, fixture_kernels.accepted_kernel)
        ]
        for problem in failures(compile_all((90,), jobs=1, specs=specs), max_spill_bytes=0):
            print(problem)
        """
    )
    env = _compiler_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    problems = run.stdout.strip().splitlines()
    assert len(problems) == 1, problems
    assert problems[0].startswith("refused_kernel sm_90") and "Cannot access global variable SCALE" in problems[0]


def test_the_check_refuses_to_run_under_the_interpreter(monkeypatch):
    from lightning_approxbp.ops.aot_compile import compile_all

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="Unset TRITON_INTERPRET"):
        compile_all((90,), specs=[])


def test_the_kernel_table_in_the_docs_is_the_generator_output_of_the_committed_results():
    import importlib.util

    path = ROOT / "benchmarks" / "kernel_compile.py"
    spec = importlib.util.spec_from_file_location("kernel_compile", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    payload = json.loads((ROOT / "benchmarks" / "results" / "kernel_compile.json").read_text())
    docs = (ROOT / "docs" / "ops.md").read_text()
    assert generator.with_summary(docs, generator.summary_table(payload)) == docs
    assert all(r["spill_stores"] == 0 for r in payload["results"])
