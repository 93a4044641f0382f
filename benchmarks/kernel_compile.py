"""Registers, spills and shared memory of every Triton kernel specialisation, for sm_80 and sm_90.

Compiles every launch the ops can make ahead of time (``lightning_approxbp.ops.aot_compile``; no
GPU needed, Triton bundles ptxas) and writes:

- ``benchmarks/results/kernel_compile.json``: one record per specialisation and architecture;
- ``benchmarks/results/kernel_compile.md``: the same, as a table;
- the summary table in ``docs/ops.md`` (between the kernel-table markers): one row per kernel,
  architecture and block configuration, with the range over dtypes and flags.

    python benchmarks/kernel_compile.py                    # compile, write all three
    python benchmarks/kernel_compile.py --from-json FILE   # re-render from a saved run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

from _harness.records import RESULTS_DIR, Payload, publish
from _harness.render import document, fill_markers, table

RESULT = "kernel_compile"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
BEGIN, END = "<!-- kernel table: begin -->", "<!-- kernel table: end -->"
_BLOCK = re.compile(r"BLOCK_(?:SIZE|BYTES)=\d+")


def _range(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def summary_table(payload: Payload) -> str:
    """One row per (kernel, arch, block, warps): counts and ranges over dtypes and flags."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in payload["results"]:
        block = _BLOCK.search(record["config"]).group(0)
        groups[(record["kernel"], record["arch"], int(block.split("=")[1]), block.split("=")[0], record["num_warps"])].append(record)
    rows = []
    for (kernel, arch, block, block_name, warps), records in sorted(groups.items()):
        dtypes = sorted({r["dtypes"] for r in records})
        pairs = sorted({" ".join(part.split("=")[1] for part in d.split()) for d in dtypes})
        rows.append([f"`{kernel}`", f"sm_{arch}", f"{block_name.lower()} {block}", warps, len(records), ", ".join(pairs),
                     _range([r["registers"] for r in records]), max(r["spill_stores"] for r in records),
                     _range([r["shared_bytes"] for r in records])])
    return document([
        f"Compiled with Triton {payload['triton']} (bundled ptxas), {payload['machine']}: "
        f"{len(payload['results'])} specialisations, {payload['seconds']:.0f} s.",
        "",
        *table(["kernel", "arch", "block", "warps", "specialisations", "data dtypes", "registers", "spill stores (bytes)",
                "shared memory (bytes)"], rows),
    ])


def render(payload: Payload) -> str:
    """Every specialisation, one row each."""
    return document([
        "# Every kernel specialisation, compiled ahead of time",
        "",
        f"Triton {payload['triton']}, {payload['machine']}. Regenerate: `python benchmarks/kernel_compile.py`.",
        "",
        *table(["kernel", "arch", "dtypes", "compile-time switches", "warps", "registers", "spill stores", "spill loads",
                "shared"],
               [[f"`{r['kernel']}`", f"sm_{r['arch']}", r["dtypes"], r["config"], r["num_warps"], r["registers"],
                 r["spill_stores"], r["spill_loads"], r["shared_bytes"]] for r in payload["results"]]),
    ])


def compile_payload(arches: tuple[int, ...]) -> Payload:
    os.environ.pop("TRITON_INTERPRET", None)
    import time
    from dataclasses import asdict

    import triton

    from lightning_approxbp.ops.aot_compile import compile_all, failures

    start = time.perf_counter()
    results = compile_all(arches)
    problems = failures(results, max_spill_bytes=0)
    if problems:
        sys.exit("kernels failed the compile check:\n" + "\n".join(problems))
    return {
        "triton": triton.__version__,
        "machine": f"CPU only ({platform.machine()}, {os.cpu_count()} cores), no GPU",
        "seconds": time.perf_counter() - start,
        "results": [asdict(r) for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", type=Path, default=None, help="render a saved kernel_compile.json instead of compiling")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    args = parser.parse_args()
    payload = json.loads(args.from_json.read_text()) if args.from_json else compile_payload((80, 90))
    publish(RESULT, payload, render, args.out)
    if fill_markers(DOCS, BEGIN, END, summary_table(payload)):
        print(f"wrote the table in {DOCS}")


if __name__ == "__main__":
    main()
