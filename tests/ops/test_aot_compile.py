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


# Launches of real workloads that the configurations on aligned, 16-divisible sizes alone (the
# check before it crossed layouts) never built: the tensors the ops hand to the launchers.
_ODD_LAUNCHES = """
import torch
from lightning_approxbp.ops import gated_mlp_triton, linear_cross_entropy_triton, ms_norm_triton, step_activation_triton
from lightning_approxbp.tables import get_table

meta = {"device": "meta"}
table = get_table("gelu", 2)
# LayerNorm over 7 columns, on rows 1: of a batch (an offset view: 28 bytes in).
x = torch.empty(5, 7, **meta)[1:]
weight, bias = torch.empty(7, **meta), torch.empty(7, **meta)
launch, y, rstd = ms_norm_triton.plan_forward(x, weight, bias, 1e-5, True, 0.0, torch.float32)
norm_backward = ms_norm_triton.plan_backward(torch.empty_like(y), y, rstd, weight, bias, True, 0.0, 1e-4, x.dtype)[0]
# bf16 LayerNorm over 1000 and 5000 columns (fused and looped rows).
wide = [
    ms_norm_triton.plan_forward(torch.empty(8, n, dtype=torch.bfloat16, **meta), torch.empty(n, **meta),
                                torch.empty(n, **meta), 1e-5, True, 0.0, torch.bfloat16)[0]
    for n in (1000, 5000)
]
# A step activation over 7 elements, and over a flat view 3 elements in.
tiny = step_activation_triton.plan_forward(torch.empty(7, **meta), list(table.thresholds), "gelu", 2)[0]
flat = torch.empty(1003, dtype=torch.bfloat16, **meta)[3:]
offset = step_activation_triton.plan_forward(flat, list(table.thresholds), "gelu", 2)[0]
# One token through a fused gate/up projection of width 2 x 11: u starts 22 bytes in.
gate_up = torch.empty(1, 22, dtype=torch.bfloat16, **meta)
gated = gated_mlp_triton.plan_forward(gate_up[:, :11], gate_up[:, 11:], "silu")[0]
# GPT-2's vocabulary, with a batch of one's shifted labels (8 bytes in).
labels = torch.empty(1, 257, dtype=torch.int64, **meta)[0, 1:]
logits = torch.empty(256, 50257, **meta)
loss = linear_cross_entropy_triton.plan_softmax_grad(logits, labels, torch.empty((), **meta), -100, 0.0, 0.0, True)[0]
LAUNCHES = {
    "layer_norm 7 cols, offset rows": launch, "its backward": norm_backward, "layer_norm 1000 cols bf16": wide[0],
    "layer_norm 5000 cols bf16": wide[1], "step activation, 7 elements": tiny, "step activation, offset view": offset,
    "gated product, offset up half": gated, "cross-entropy, GPT-2 vocabulary, shifted labels": loss,
}
"""


def test_odd_widths_tiny_tensors_and_offset_views_are_compiled():
    script = textwrap.dedent(
        """
        import json
        from lightning_approxbp.ops.aot_compile import compile_specs, spec_for, specialisation_key
        from lightning_approxbp.ops.aot_launches import all_launches

        compiled = {specialisation_key(s) for s in compile_specs()}
        common_only = {specialisation_key(s) for s in compile_specs(all_launches(all_layouts=False))}
        keys = {name: specialisation_key(spec_for(launch)) for name, launch in LAUNCHES.items()}
        print(json.dumps({
            "missing": [name for name, key in keys.items() if key not in compiled],
            "built_before": [name for name, key in keys.items() if key in common_only],
            "counts": [len(common_only), len(compiled)],
        }))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", _ODD_LAUNCHES + script], cwd=ROOT, env=_compiler_env(), capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["missing"] == []
    assert found["built_before"] == []
    common_only, compiled = found["counts"]
    assert common_only < compiled


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


def test_the_kernel_table_in_the_docs_is_the_generator_output_of_the_committed_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as ``python benchmarks/kernel_compile.py`` runs it
    generator = importlib.import_module("kernel_compile")
    from _harness.render import with_markers

    payload = json.loads((ROOT / "benchmarks" / "results" / "kernel_compile.json").read_text())
    docs = (ROOT / "docs" / "ops.md").read_text()
    assert with_markers(docs, generator.BEGIN, generator.END, generator.summary_table(payload)) == docs
    assert all(r["spill_stores"] == 0 for r in payload["results"])
