"""Everything that needs a CUDA GPU, in one command, with results named after the card.

    python benchmarks/gpu_all.py

Runs, in order, each step even if an earlier one failed:

1. the tests with the compiled Triton kernels (``tests/ops``: every kernel against the PyTorch
   path; on CUDA the conftest does not switch to the interpreter) and every ``gpu``-marked test;
2. ``benchmarks/ops.py``: per-op time and bandwidth against torch and a device copy;
3. ``benchmarks/gpu_training.py``: Lightning training peak memory and throughput (ViT-B full
   fine-tuning, LLaMA-shaped LoRA; baseline, ApproxBP, gradient checkpointing, Liger-Kernel if
   installed);
4. ``benchmarks/make_readme_results.py``: the README's results section from all result files.

The test log goes to ``benchmarks/results/gpu_tests_cuda.md`` with the card's name; the
benchmarks write their own ``*_cuda.*`` files (which name the card). Exits non-zero if any
step failed. Without a CUDA device it says so and exits 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from _harness.records import RESULTS_DIR
from _harness.render import table

ROOT = Path(__file__).resolve().parents[1]


def _run(title: str, command: list[str]) -> tuple[str, int, float, str]:
    print(f"==> {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    output = process.stdout + process.stderr
    print(output[-3000:], flush=True)
    return title, process.returncode, time.perf_counter() - start, output


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu_all.py needs a CUDA device; none is visible to torch.", file=sys.stderr)
        return 1
    card = torch.cuda.get_device_name(0)
    python = sys.executable
    tests = _run("compiled-kernel and gpu tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops"])
    gpu_marked = _run("gpu-marked tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"])
    steps = [
        tests,
        gpu_marked,
        _run("kernel benchmark", [python, "benchmarks/ops.py"]),
        _run("Lightning training benchmark", [python, "benchmarks/gpu_training.py"]),
        _run("README results", [python, "benchmarks/make_readme_results.py"]),
    ]
    lines = [
        f"# GPU run on {card}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}. Produced by `python benchmarks/gpu_all.py`.",
        "",
        *table(["step", "exit status", "seconds"], [[title, code, f"{seconds:.0f}"] for title, code, seconds, _ in steps]),
        "",
    ]
    for title, _, _, output in (tests, gpu_marked):
        summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
        lines += [f"## {title}", "", "```", *(summary[-5:] or ["(no pytest summary line)"]), "```", ""]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "gpu_tests_cuda.md").write_text("\n".join(lines))
    failed = [title for title, code, _, _ in steps if code != 0]
    print(f"GPU run on {card}: {len(steps) - len(failed)}/{len(steps)} steps passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
