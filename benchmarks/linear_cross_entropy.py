"""LM head + loss on CPU: the fused linear + cross-entropy against ``F.linear`` + ``F.cross_entropy``.

A LLaMA-3-shaped head (hidden 4096, vocabulary 128256) on 4096 tokens under bf16 autocast, for
two heads: ``frozen bf16`` (LoRA fine-tuning: the head is frozen and stored in bf16, as
``ApproxBPPrecision`` stores frozen weights) and ``trainable fp32`` (the weight gradient, 2 GiB
in fp32, is then part of both paths' peak). One step is forward + backward of head and loss:

- ``unfused``: ``F.cross_entropy(F.linear(hidden, weight).float(), target)``, transformers' loss;
- ``fused``: ``lightning_approxbp.functional.linear_cross_entropy(hidden, weight, target)``.

Memory: each (head, path) runs in a fresh process that builds its inputs, resets its peak RSS
(``/proc/self/clear_refs``) and reports the peak RSS growth of one step (``VmHWM`` minus the RSS
before it) and the bytes saved for backward (parameters excluded). Time: both paths in this
process, one warm-up step each, then interleaved rounds (order alternating); medians and the
median per-round ratio.

    python benchmarks/linear_cross_entropy.py           # writes results/linear_cross_entropy_cpu.{json,md}
    python benchmarks/linear_cross_entropy.py --quick   # hidden 256, vocab 8192, 512 tokens; prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS_DIR, machine_name, write_results

from lightning_approxbp.functional import linear_cross_entropy
from lightning_approxbp.saved_tensors import SavedTensorCounter

FULL = {"tokens": 4096, "hidden": 4096, "vocab": 128256}
QUICK = {"tokens": 512, "hidden": 256, "vocab": 8192}
HEADS = ("frozen bf16", "trainable fp32")
PATHS = ("unfused", "fused")
TARGETS = {"peak_ratio": 1 / 8, "time_ratio": 1.2}


def inputs(head: str, tokens: int, hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    frozen = head == "frozen bf16"
    weight = (torch.randn(vocab, hidden, dtype=torch.bfloat16 if frozen else torch.float32) * 0.02).requires_grad_(not frozen)
    x = torch.randn(tokens, hidden, requires_grad=True)
    return x, weight, torch.randint(0, vocab, (tokens,))


def step(path: str, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
    x.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "fused":
            loss = linear_cross_entropy(x, weight, target)
        else:
            loss = F.cross_entropy(F.linear(x, weight).float(), target)
    loss.backward()


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(head: str, path: str, shape: dict[str, int]) -> dict:
    """One step in this fresh process: peak RSS growth, saved bytes, wall time."""
    x, weight, target = inputs(head, **shape)
    with SavedTensorCounter(exclude=[weight]) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "fused":
            linear_cross_entropy(x, weight, target)
        else:
            F.cross_entropy(F.linear(x, weight).float(), target)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _proc_kib("VmRSS")
    start = time.perf_counter()
    step(path, x, weight, target)
    seconds = time.perf_counter() - start
    return {"head": head, "path": path, "peak_rss_delta_bytes": (_proc_kib("VmHWM") - before) * 1024,
            "saved_bytes": counter.stats.activation_bytes, "step_s": seconds}


def measure_memory(shape: dict[str, int], heads: list[str]) -> list[dict]:
    rows = []
    for head in heads:
        for path in PATHS:
            command = [sys.executable, __file__, "--child", head, path, json.dumps(shape)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def measure_time(shape: dict[str, int], rounds: int, heads: list[str]) -> list[dict]:
    rows = []
    for head in heads:
        x, weight, target = inputs(head, **shape)
        for path in PATHS:  # warm-up: first-call allocations and kernel selection
            step(path, x, weight, target)
        samples: dict[str, list[float]] = {path: [] for path in PATHS}
        ratios = []
        for round_index in range(rounds):
            order = PATHS if round_index % 2 == 0 else PATHS[::-1]
            for path in order:
                start = time.perf_counter()
                step(path, x, weight, target)
                samples[path].append(time.perf_counter() - start)
            ratios.append(samples["fused"][-1] / samples["unfused"][-1])
        rows.append({"head": head, "rounds": rounds, "unfused_s": statistics.median(samples["unfused"]),
                     "fused_s": statistics.median(samples["fused"]), "time_ratio": statistics.median(ratios)})
    return rows


def render(payload: dict) -> str:
    shape = payload["shape"]
    lines = [
        f"# Fused linear + cross-entropy vs unfused head + loss ({payload['machine']})",
        "",
        (f"{shape['tokens']} tokens, hidden {shape['hidden']}, vocabulary {shape['vocab']}, bf16 autocast, "
        f"forward + backward; load average before the run: {payload['load_before']}; "
        f"{'quick run' if payload['quick'] else 'full run'}."),
        "",
        "| head | path | peak RSS growth (MiB) | saved for backward (MiB) | median step (s) |",
        "|---|---|---:|---:|---:|",
    ]
    timing = {row["head"]: row for row in payload["time"]}
    for row in payload["memory"]:
        seconds = timing[row["head"]][f"{row['path']}_s"]
        lines.append(f"| {row['head']} | {row['path']} | {row['peak_rss_delta_bytes'] / 2**20:,.0f} | "
                     f"{row['saved_bytes'] / 2**20:,.1f} | {seconds:.2f} |")
    lines += ["", "| head | peak ratio (target <= 1/8) | saved ratio | time ratio (target <= 1.2) |", "|---|---:|---:|---:|"]
    for row in payload["results"]:
        lines.append(f"| {row['head']} | {row['peak_ratio']:.3f} | {row['saved_ratio']:.4f} | {row['time_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round, prints only (or --out DIR)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per head")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR}; none with --quick)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="heads to measure")
    parser.add_argument("--child", nargs=3, metavar=("HEAD", "PATH", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], json.loads(args.child[2]))))
        return
    shape = QUICK if args.quick else FULL
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    memory = measure_memory(shape, args.heads)
    timing = measure_time(shape, 1 if args.quick else args.rounds, args.heads)
    results = []
    for row in timing:
        cells = {m["path"]: m for m in memory if m["head"] == row["head"]}
        results.append({
            "head": row["head"],
            "peak_ratio": cells["fused"]["peak_rss_delta_bytes"] / cells["unfused"]["peak_rss_delta_bytes"],
            "saved_ratio": cells["fused"]["saved_bytes"] / cells["unfused"]["saved_bytes"],
            "time_ratio": row["time_ratio"],
        })
    payload = {"machine": machine_name(torch.device("cpu")), "quick": args.quick, "shape": shape,
               "load_before": load_before, "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
               "targets": TARGETS, "memory": memory, "time": timing, "results": results}
    markdown = render(payload)
    print(markdown)
    out = args.out if args.out is not None else (None if args.quick else RESULTS_DIR)
    if out is not None:
        write_results("linear_cross_entropy", torch.device("cpu"), payload, markdown, out)


if __name__ == "__main__":
    main()
