"""LM head + loss on CPU: the fused linear + cross-entropy against ``F.linear`` + ``F.cross_entropy``.

A LLaMA-3-shaped head (hidden 4096, vocabulary 128256) on 4096 tokens under bf16 autocast, for
two heads: ``frozen bf16`` (LoRA fine-tuning: the head is frozen and stored in bf16, as
``ApproxBPPrecision`` stores frozen weights) and ``trainable fp32`` (the weight gradient, 2 GiB
in fp32, is then part of both paths' peak). One step is forward + backward of head and loss:

- ``unfused``: ``F.cross_entropy(F.linear(hidden, weight).float(), target)``, transformers' loss;
- ``fused``: ``lightning_approxbp.functional.linear_cross_entropy(hidden, weight, target)``.

Memory: each (head, path) runs in a fresh process that builds its inputs, resets its peak RSS
(``/proc/self/clear_refs``) and reports the peak RSS growth of one step (``VmHWM`` minus the RSS
before it) and the bytes saved for backward (parameters excluded). The step leaves the gradients
of ``hidden`` and (trainable) of the weight, the same bytes in both paths (the trainable head's
2 GiB fp32 weight gradient alone is 2/7 of the unfused peak): the tables also give the peak
minus those gradients, the step's working memory. Time: both paths in this process, one warm-up
step each, then interleaved rounds (order alternating); medians and the median per-round ratio.

``--scale K`` measures memory only, on every dimension divided by ``K`` (tokens, hidden,
vocabulary, and the op's chunk and vocabulary slice), so every buffer is ``1/K^2`` of its
full-size counterpart: for machines where the full shape takes hours (16-bit matmuls without
native support). Its children allocate every buffer of 64 KiB and more with ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so that a freed buffer leaves the RSS as full-size ones do.

    python benchmarks/linear_cross_entropy.py           # writes results/linear_cross_entropy_cpu.{json,md}
    python benchmarks/linear_cross_entropy.py --quick   # hidden 256, vocab 8192, 512 tokens; prints only
    python benchmarks/linear_cross_entropy.py --scale 8 # memory at 1/8 of each dimension, merged into the results
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
from _common import load_average, machine_name, proc_status_bytes, reset_peak_rss
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import document, table

from lightning_approxbp.functional import linear_cross_entropy
from lightning_approxbp.ops import linear_cross_entropy as lce
from lightning_approxbp.saved_tensors import SavedTensorCounter

RESULT = "linear_cross_entropy_cpu"
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


def loss(path: str, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The head and loss forward, under bf16 autocast: fused, or as a model computes it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "fused":
            return linear_cross_entropy(x, weight, target, chunk_size=chunk)
        return F.cross_entropy(F.linear(x, weight).float(), target)


def step(path: str, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None) -> None:
    x.grad = weight.grad = None
    loss(path, x, weight, target, chunk).backward()


def scaled_shape(scale: int, head: str) -> dict[str, int]:
    """``FULL`` with every dimension divided by ``scale``, and the fused op's full-size chunk too."""
    chunk = lce.default_chunk_size(FULL["tokens"], FULL["vocab"], weight_trains=head == "trainable fp32")
    return {**{key: value // scale for key, value in FULL.items()}, "chunk": chunk // scale, "scale": scale}


def gradient_bytes(head: str, shape: dict[str, int]) -> int:
    """What the step leaves: the fp32 gradient of ``hidden`` and, trainable, of the fp32 weight."""
    weight = shape["vocab"] * shape["hidden"] * 4 if head == "trainable fp32" else 0
    return shape["tokens"] * shape["hidden"] * 4 + weight


def child(head: str, path: str, shape: dict[str, int]) -> dict:
    """One step in this fresh process: peak RSS growth, saved bytes, wall time."""
    scale, chunk = shape.pop("scale", 1), shape.pop("chunk", None)
    lce._SLICE_BYTES //= scale**2  # slices of the same share of the weight as at full size
    x, weight, target = inputs(head, **shape)
    with SavedTensorCounter(exclude=[weight]) as counter:
        loss(path, x, weight, target, chunk)
    reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    step(path, x, weight, target, chunk)
    seconds = time.perf_counter() - start
    return {"head": head, "path": path, "peak_rss_delta_bytes": proc_status_bytes("VmHWM") - before,
            "saved_bytes": counter.stats.activation_bytes, "step_s": seconds}


def measure_memory(shape: dict[str, int], heads: list[str], scale: int = 1) -> list[dict]:
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if scale > 1 else {})}
    rows = []
    for head in heads:
        head_shape = scaled_shape(scale, head) if scale > 1 else shape
        for path in PATHS:
            command = [sys.executable, __file__, "--child", head, path, json.dumps(head_shape)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["gradient_bytes"] = gradient_bytes(head, head_shape)
            rows.append(row)
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


def memory_ratios(memory: list[dict], head: str) -> dict[str, float]:
    """Fused over unfused for one head: peak RSS growth, the same minus the gradients, saved bytes."""
    cells = {m["path"]: m for m in memory if m["head"] == head}
    fused, unfused = cells["fused"], cells["unfused"]
    return {
        "peak_ratio": fused["peak_rss_delta_bytes"] / unfused["peak_rss_delta_bytes"],
        "working_ratio": ((fused["peak_rss_delta_bytes"] - fused["gradient_bytes"])
                          / (unfused["peak_rss_delta_bytes"] - unfused["gradient_bytes"])),
        "saved_ratio": fused["saved_bytes"] / unfused["saved_bytes"],
    }


def _memory_table(memory: list[dict], factor: int, timing: dict[str, dict] | None) -> list[str]:
    cells = []
    for row in memory:
        seconds = f"{timing[row['head']][row['path'] + '_s']:.2f}" if timing else "-"
        peak, grads = row["peak_rss_delta_bytes"] * factor, row["gradient_bytes"] * factor
        cells.append([row["head"], row["path"], f"{peak / 2**20:,.0f}", f"{(peak - grads) / 2**20:,.0f}",
                      f"{row['saved_bytes'] * factor / 2**20:,.1f}", seconds])
    header = ["head", "path", "peak RSS growth (MiB)", "minus the gradients (MiB)", "saved for backward (MiB)",
              "median step (s)"]
    return table(header, cells, right_aligned=header[2:])


def render(payload: Payload) -> str:
    shape = payload["shape"]
    version = payload.get("commit", "not recorded (before the sliced weight cast of commit f079d51)")
    lines = [
        f"# Fused linear + cross-entropy vs unfused head + loss ({payload['machine']})",
        "",
        (f"{shape['tokens']} tokens, hidden {shape['hidden']}, vocabulary {shape['vocab']}, bf16 autocast, "
        f"forward + backward; load average before the run: {payload['load_before']}; "
        f"{'quick run' if payload['quick'] else 'full run'}; version of the op: {version}. "
        "'minus the gradients': the peak less the gradients the step leaves (of hidden, and of a trainable weight), "
        "the same bytes in both paths."),
        "",
        *_memory_table(payload["memory"], 1, {row["head"]: row for row in payload["time"]}),
        "",
        *_ratio_table(payload["results"], timed=True),
    ]
    scaled = payload.get("scaled")
    if scaled:
        factor = scaled["scale"] ** 2
        lines += [
            "",
            f"## Memory at 1/{scaled['scale']} of every dimension (version of the op: {scaled['commit']})",
            "",
            (f"`--scale {scaled['scale']}`: {scaled['shape']['tokens']} tokens, hidden {scaled['shape']['hidden']}, "
             f"vocabulary {scaled['shape']['vocab']}, the chunk and vocabulary slice scaled alike; each (head, path) "
             f"in a fresh process; figures multiplied by {factor} (every buffer scales as 1/{factor}); no timing; "
             f"load average before the run: {scaled['load_before']}. Where it differs from the full run above, "
             "this one measures the current op."),
            "",
            *_memory_table(scaled["memory"], factor, None),
            "",
            *_ratio_table(scaled["results"], timed=False),
        ]
    return document(lines)


def _ratio_table(results: list[dict], timed: bool) -> list[str]:
    """Fused over unfused per head; the time ratio only for a timed run (the scaled runs are not)."""
    header = ["head", "peak ratio (target <= 1/8)", "minus the gradients", "saved ratio"]
    header += ["time ratio (target <= 1.2)"] if timed else []
    cells = [[row["head"], f"{row['peak_ratio']:.3f}", f"{row['working_ratio']:.3f}", f"{row['saved_ratio']:.4f}",
              *([f"{row['time_ratio']:.3f}"] if timed else [])] for row in results]
    return table(header, cells, right_aligned=header[1:])


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], check=False, capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = arguments(__doc__, "small shapes, 1 round, prints only (or --out DIR)")
    parser.add_argument("--scale", type=int, default=1,
                        help="memory only, every dimension divided by this; merged into the results in --out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per head")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="heads to measure")
    parser.add_argument("--child", nargs=3, metavar=("HEAD", "PATH", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], json.loads(args.child[2]))))
        return
    out = out_folder(args.out, args.quick)
    load_before = load_average()
    if args.scale > 1:
        if out is None or not (out / f"{RESULT}.json").exists():
            parser.error("--scale merges into an earlier full run's results: pass --out DIR holding one")
        payload = json.loads((out / f"{RESULT}.json").read_text())
        for row in payload["memory"]:  # a run from before the gradients were reported: they follow from the shape
            row.setdefault("gradient_bytes", gradient_bytes(row["head"], payload["shape"]))
        payload["results"] = [{**row, **memory_ratios(payload["memory"], row["head"])} for row in payload["results"]]
        memory = measure_memory(FULL, args.heads, args.scale)
        payload["scaled"] = {
            "scale": args.scale, "shape": {key: value // args.scale for key, value in FULL.items()},
            "commit": _commit(), "load_before": load_before, "memory": memory,
            "results": [{"head": head, **memory_ratios(memory, head)} for head in args.heads],
        }
    else:
        shape = QUICK if args.quick else FULL
        memory = measure_memory(shape, args.heads)
        timing = measure_time(shape, 1 if args.quick else args.rounds, args.heads)
        results = [{"head": row["head"], **memory_ratios(memory, row["head"]), "time_ratio": row["time_ratio"]}
                   for row in timing]
        payload = {"machine": machine_name(torch.device("cpu")), "quick": args.quick, "shape": shape,
                   "commit": _commit(), "load_before": load_before,
                   "load_after": load_average(),
                   "targets": TARGETS, "memory": memory, "time": timing, "results": results}
    publish(RESULT, payload, render, out)


if __name__ == "__main__":
    main()
