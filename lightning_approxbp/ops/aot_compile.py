"""Compile every Triton kernel the launchers can launch, for real GPUs, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) accepts code that the
compiler refuses, so passing tests do not prove that a kernel compiles. This check does: it
calls the launchers' planning functions (``plan_forward`` / ``plan_backward``) on meta tensors
over every configuration the ops accept and every property of sizes and pointers that Triton's
JIT specialises on (:mod:`.aot_launches`), keeps each distinct specialisation once, and compiles
it with Triton's own compiler for each target architecture, exactly as the runtime would
specialise it (same signature, constexprs, ``num_warps`` and alignment hints, through Triton's
own specialisation rule). ``ptxas`` reports registers and spills; a compile error or any spill
above the budget fails the check.

Triton bundles ``ptxas``, so no GPU, driver or CUDA toolkit is needed. Run it as a module (the
kernels must be imported without ``TRITON_INTERPRET``)::

    python -m lightning_approxbp.ops.aot_compile                 # sm_80 and sm_90, all kernels
    python -m lightning_approxbp.ops.aot_compile --arch 90 --json kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from lightning_approxbp.ops.aot_launches import all_launches
from lightning_approxbp.ops.kernel_launch import KernelLaunch

DEFAULT_ARCHES = (80, 90)

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


# ----------------------------------------------------------------------------- specialisations


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


def spec_for(launch: KernelLaunch) -> CompileSpec:
    """What Triton would compile for ``launch``."""
    signature, constexprs, attrs = _specialisation(launch)
    kernel = launch.kernel
    return CompileSpec(
        kernel.fn.__module__, kernel.__name__, signature, constexprs, attrs, launch.num_warps,
        *_describe(signature, constexprs),
    )


def specialisation_key(spec: CompileSpec) -> str:
    """What Triton's kernel cache tells compiles apart by: the kernel, each argument's type and
    attributes, the constexprs and the options (here ``num_warps``)."""
    return repr((spec.kernel_module, spec.kernel_name, spec.signature, spec.constexprs, spec.attrs, spec.num_warps))


def compile_specs(launches: Iterable[KernelLaunch] | None = None) -> list[CompileSpec]:
    """Each distinct specialisation of ``launches`` (default: every launch the ops can make,
    :mod:`.aot_launches`) once, in a stable order."""
    specs: dict[str, CompileSpec] = {}
    for launch in all_launches() if launches is None else launches:
        spec = spec_for(launch)
        specs.setdefault(specialisation_key(spec), spec)
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
