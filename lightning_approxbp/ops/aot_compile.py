"""Compile every Triton kernel the launchers can launch, for real GPUs, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) accepts code that the
compiler refuses, so passing tests do not prove that a kernel compiles. This check does: it
calls the launchers' planning functions (``plan_forward`` / ``plan_backward``) on meta tensors
for every input the ops accept (each dtype and dtype pair, activation, code width, norm flag
combination and row-length class), keeps each distinct launch once, and compiles it with
Triton's own compiler for each target architecture, exactly as the runtime would specialise it
(same signature, constexprs, ``num_warps`` and alignment hints, through Triton's own
specialisation rule). ``ptxas`` reports registers and spills; a compile error or any spill above
the budget fails the check.

Triton bundles ``ptxas``, so no GPU, driver or CUDA toolkit is needed. Run it as a module (the
kernels must be imported without ``TRITON_INTERPRET``)::

    python -m lightning_approxbp.ops.aot_compile                 # sm_80 and sm_90, all kernels
    python -m lightning_approxbp.ops.aot_compile --arch 90 --json kernels.json

Alignment hints follow 16-byte-aligned buffers and row lengths that are multiples of 16 (every
real hidden size); other lengths run the same code with fewer vectorisation hints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from lightning_approxbp.ops._utils import packed_size
from lightning_approxbp.ops.dispatch import TRITON_DTYPES
from lightning_approxbp.ops.kernel_launch import KernelLaunch

DEFAULT_ARCHES = (80, 90)
# Element counts of the representative launches: large and 16-aligned, like real activations.
_ELEMENTS = 1 << 20
_ROWS = 4096
# Row lengths from one aligned vector up to past any hidden size in use; the launcher maps
# them onto its few row configurations.
_ROW_LENGTHS = tuple(1 << p for p in range(4, 18))

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class CompileResult:
    """One specialisation compiled for one architecture."""

    kernel: str
    arch: int
    dtypes: str
    config: str
    num_warps: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    shared_bytes: int | None
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class CompileSpec:
    """What to hand ``triton.compile`` for one launch: picklable, so compile workers need not
    re-plan the launches."""

    kernel_module: str
    kernel_name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int], list]
    num_warps: int
    dtypes: str
    config: str


# ----------------------------------------------------------------------------- the launches


def _step_activation_launches() -> Iterator[KernelLaunch]:
    from lightning_approxbp.activations import ACTIVATIONS
    from lightning_approxbp.ops import step_activation_triton as kernels
    from lightning_approxbp.tables import SUPPORTED_BITS, get_table

    for dtype, bits in itertools.product(TRITON_DTYPES, SUPPORTED_BITS):
        x = torch.empty(_ELEMENTS, dtype=dtype, device="meta")
        for activation in ACTIVATIONS:
            table = get_table(activation, bits)
            yield kernels.plan_forward(x, list(table.thresholds), activation, bits)[0]
        codes = torch.empty(packed_size(_ELEMENTS, bits), dtype=torch.uint8, device="meta")
        nonfinite = torch.empty(1, dtype=torch.int32, device="meta")
        yield kernels.plan_backward(x, codes, nonfinite, list(get_table("gelu", bits).levels), bits)[0]


def _gated_mlp_launches() -> Iterator[KernelLaunch]:
    from lightning_approxbp.activations import ACTIVATIONS
    from lightning_approxbp.ops import gated_mlp_triton as kernels

    for dtype, activation in itertools.product(TRITON_DTYPES, ACTIVATIONS):
        g = torch.empty(_ELEMENTS, dtype=dtype, device="meta")
        yield kernels.plan_forward(g, torch.empty_like(g), activation)[0]
        yield kernels.plan_backward(torch.empty_like(g), g, torch.empty_like(g), activation)[0]


def _ms_norm_launches() -> Iterator[KernelLaunch]:
    from lightning_approxbp.ops import ms_norm_triton as kernels

    flags = itertools.product((True, False), repeat=3)
    for (in_dtype, out_dtype), (centered, has_weight, has_bias), n_cols in itertools.product(
        itertools.product(TRITON_DTYPES, repeat=2), flags, _ROW_LENGTHS
    ):
        x = torch.empty(_ROWS, n_cols, dtype=in_dtype, device="meta")
        weight = torch.empty(n_cols, dtype=in_dtype, device="meta") if has_weight else None
        bias = torch.empty(n_cols, dtype=in_dtype, device="meta") if has_bias else None
        launch, y, rstd = kernels.plan_forward(x, weight, bias, 1e-5, centered, 0.0, out_dtype)
        yield launch
        grad = torch.empty_like(y)
        yield kernels.plan_backward(grad, y, rstd, weight, bias, centered, 0.0, 1e-4, x.dtype)[0]


def _linear_cross_entropy_launches() -> Iterator[KernelLaunch]:
    from lightning_approxbp.ops import linear_cross_entropy_triton as kernels

    # A LLaMA-3-sized chunk (aligned rows); the scale is 0-d in the forward, per row in the
    # backward of reduction="none", and unused when no gradient is needed.
    target = torch.empty(256, dtype=torch.int64, device="meta")
    scales = {"0-d": torch.empty((), device="meta"), "per-row": torch.empty(256, device="meta")}
    for dtype, softcap in itertools.product(TRITON_DTYPES, (0.0, 30.0)):
        logits = torch.empty(256, 128256, dtype=dtype, device="meta")
        yield kernels.plan_softmax_grad(logits, target, scales["0-d"], -100, 0.0, softcap, False)[0]
        for scale in scales.values():
            yield kernels.plan_softmax_grad(logits, target, scale, -100, 0.1, softcap, True)[0]


def _specialisation(launch: KernelLaunch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """Signature, constexprs and attributes as Triton's runtime would derive them at launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    for param in launch.kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = launch.constexprs[param.name]
            continue
        value = launch.args[param.name]
        kind, attr = native_specialize_impl(
            BaseBackend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif attr:
            attrs[(param.num,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _key(launch: KernelLaunch) -> str:
    signature, constexprs, attrs = _specialisation(launch)
    return repr((launch.kernel.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()), launch.num_warps))


def spec_for(launch: KernelLaunch) -> CompileSpec:
    """What Triton would compile for ``launch``."""
    signature, constexprs, attrs = _specialisation(launch)
    kernel = launch.kernel
    return CompileSpec(
        kernel.fn.__module__, kernel.__name__, signature, constexprs, attrs, launch.num_warps,
        *_describe(signature, constexprs),
    )


def compile_specs() -> list[CompileSpec]:
    """Every distinct launch the ops can make, in a stable order."""
    specs: dict[str, CompileSpec] = {}
    for launch in itertools.chain(
        _step_activation_launches(), _gated_mlp_launches(), _ms_norm_launches(), _linear_cross_entropy_launches()
    ):
        spec = spec_for(launch)
        specs.setdefault(repr((spec.kernel_name, spec.signature, spec.constexprs, spec.attrs, spec.num_warps)), spec)
    return list(specs.values())


_DATA_POINTERS = ("X_ptr", "Y_ptr", "DY_ptr", "DX_ptr", "G_ptr", "DH_ptr", "Logits_ptr")


def _describe(signature: dict[str, str], constexprs: dict[str, Any]) -> tuple[str, str]:
    """(data dtypes, compile-time switches) of a launch, for reports."""
    dtypes = " ".join(f"{name.removesuffix('_ptr')}={signature[name][1:]}" for name in _DATA_POINTERS if name in signature)
    config = " ".join(f"{name}={value}" for name, value in constexprs.items() if not name.endswith("_ptr"))
    return dtypes, config


# ----------------------------------------------------------------------------- compiling


def _compile(spec: CompileSpec, arch: int) -> CompileResult:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.kernel_module), spec.kernel_name)
    described = (spec.kernel_name, arch, spec.dtypes, spec.config, spec.num_warps)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # ptxas' report (registers, spills) is printed by Triton when TRITON_DUMP_PTXAS_LOG is set.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps},
            )
    except Exception as error:  # noqa: BLE001 - every compile failure is a finding to report
        return CompileResult(*described, None, None, None, None, time.perf_counter() - start, error=_reason(error))
    text = log.getvalue()
    registers = _REGISTERS.search(text)
    spills = _SPILLS.search(text)
    return CompileResult(
        *described,
        registers=int(registers.group(1)) if registers else None,
        spill_stores=int(spills.group(1)) if spills else None,
        spill_loads=int(spills.group(2)) if spills else None,
        shared_bytes=int(compiled.metadata.shared),
        seconds=time.perf_counter() - start,
    )


def _reason(error: BaseException) -> str:
    """The innermost cause, in one line: Triton nests errors of inlined functions."""
    while error.__cause__ is not None:
        error = error.__cause__
    # A CompilationError's last argument is the message; str() would add the source listing.
    text = error.args[-1] if error.args and isinstance(error.args[-1], str) else str(error)
    return " ".join(f"{type(error).__name__}: {text}".split())[:400]


def _compile_task(task: tuple[CompileSpec, int]) -> CompileResult:
    return _compile(*task)


def compile_all(
    arches: tuple[int, ...] = DEFAULT_ARCHES,
    jobs: int | None = None,
    specs: list[CompileSpec] | None = None,
) -> list[CompileResult]:
    """Compile every launch (or ``specs``) for every architecture in ``jobs`` processes.

    Each run uses a fresh Triton cache, so every kernel really goes through the compiler and
    ptxas (a cached kernel would bring no ptxas report).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("Unset TRITON_INTERPRET: the interpreter replaces the kernels that this check compiles.")
    specs = compile_specs() if specs is None else specs
    tasks = [(spec, arch) for arch in arches for spec in specs]
    with contextlib.ExitStack() as stack:
        cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="approxbp-aot-"))
        # Workers are spawned (fresh, never a forked Triton state) and inherit this environment.
        stack.enter_context(_environment(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1"))
        pool = stack.enter_context(
            ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=get_context("spawn"))
        )
        return list(pool.map(_compile_task, tasks, chunksize=4))


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def failures(results: list[CompileResult], max_spill_bytes: int) -> list[str]:
    """Why the check fails: compile errors, missing ptxas reports and spills above the budget."""
    problems = []
    for r in results:
        where = f"{r.kernel} sm_{r.arch} [{r.dtypes}] [{r.config}] num_warps={r.num_warps}"
        if r.error:
            problems.append(f"{where}: {r.error}")
        elif r.spill_stores is None:
            problems.append(f"{where}: ptxas printed no register/spill report")
        elif r.spill_stores > max_spill_bytes:
            problems.append(f"{where}: {r.spill_stores} bytes of spill stores (budget {max_spill_bytes})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_approxbp.ops.aot_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHES), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--max-spill-bytes", type=int, default=0, help="spill stores allowed per kernel (default 0)")
    parser.add_argument("--kernel", nargs="+", default=None, help="only these kernels (function names)")
    parser.add_argument("--json", type=Path, default=None, help="write every result to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    specs = [s for s in compile_specs() if args.kernel is None or s.kernel_name in args.kernel]
    results = compile_all(tuple(args.arch), args.jobs, specs)
    elapsed = time.perf_counter() - start
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    problems = failures(results, args.max_spill_bytes)
    worst = max((r.spill_stores or 0 for r in results), default=0)
    print(
        f"compiled {len(results)} kernel specialisations for sm_{', sm_'.join(map(str, args.arch))} "
        f"in {elapsed:.0f} s; max registers {max((r.registers or 0) for r in results)}, max spill stores {worst} bytes"
    )
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
