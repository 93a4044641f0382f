"""What ``convert`` costs at setup on LLaMA-7B and -70B-sized models: time per phase and peak host memory.

Each case builds a transformers ``LlamaForCausalLM`` at LLaMA's true widths and converts it with
``lightning_approxbp.convert`` using a probe batch with labels (so the probe returns the loss as a
training step does), in a fresh process of its own, so that no case inherits another's memory
peak. Cases:

- ``llama7b-shaped-fp32``: 2 layers at 7B widths, vocabulary 1,000, fp32 (what a full fine-tune converts);
- ``llama7b-bf16-{2,4,8,12}-layers``: 7B widths, the real vocabulary (32,000), real bf16 weights,
  probe 2 x 128: how the cost grows with depth (structure first: recognition once per block kind,
  one representative verified per block kind, the probe on fake tensors for deep models);
- ``llama7b-meta`` and ``llama70b-meta``: all 32 or 80 layers built on the meta device (no
  memory), probe 1 x 64: converted without ever materialising the model (recognition and the
  per-block check run on a materialised copy of one block).

Reported per case: the model's own bytes, wall time per phase of ``convert`` (``collect``: find
and recognise norms, activations and gated MLPs; ``reference probe``: the original model on the
probe batch, norm uses traced; ``apply``: the swaps; ``converted probe``: the converted model on
the probe batch; ``verify``: compare the whole outputs; ``block checks``: each block kind's
representative before and after), the peak RSS of each phase (``VmHWM``, reset at each phase's
start through ``/proc/self/clear_refs``) above the RSS before ``convert``, and the process's peak
RSS. The phases are timed by wrapping the engine's internal steps, so the split follows the
engine's structure; ``other`` is the rest of ``convert``.

    python benchmarks/conversion_cost.py            # writes results/conversion_cost_cpu.{json,md}
    python benchmarks/conversion_cost.py --quick    # toy widths, prints only (or --out DIR)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from _common import load_average, machine_name, proc_status_bytes, reset_peak_rss, run_child
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import section, table

PHASES: tuple[str, ...] = ("collect", "reference probe", "apply", "converted probe", "verify", "block checks")
TIMEOUT_S = 1800.0
MiB = 2**20
RESULT = "conversion_cost_cpu"
CHILD_LINE = "RESULT "  # marks the child's JSON line among whatever else it prints


@dataclass(frozen=True)
class Case:
    """One model to convert: LLaMA widths, layers, vocabulary, dtype, device, probe."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    dtype: str
    kv_heads: int | None = None
    device: str = "cpu"
    probe: bool = True
    samples: int = 2
    tokens: int = 128


def cases(quick: bool) -> list[Case]:
    if quick:  # toy widths: the same code paths in seconds
        widths: dict[str, Any] = {"hidden": 64, "intermediate": 172, "heads": 4, "tokens": 16}
        return [
            Case("toy-fp32", layers=2, vocab=100, dtype="float32", **widths),
            Case("toy-bf16-2-layers", layers=2, vocab=100, dtype="bfloat16", **widths),
            Case("toy-bf16-6-layers", layers=6, vocab=100, dtype="bfloat16", **widths),
            Case("toy-meta", layers=6, vocab=100, dtype="bfloat16", device="meta", samples=1, **widths),
        ]
    llama7b = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32}
    llama70b = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8}
    return [
        Case("llama7b-shaped-fp32", layers=2, vocab=1000, dtype="float32", **llama7b),
        *(Case(f"llama7b-bf16-{n}-layers", layers=n, vocab=32000, dtype="bfloat16", **llama7b) for n in (2, 4, 8, 12)),
        Case("llama7b-meta", layers=32, vocab=32000, dtype="bfloat16", device="meta", samples=1, tokens=64, **llama7b),
        Case("llama70b-meta", layers=80, vocab=128256, dtype="bfloat16", device="meta", samples=1, tokens=64, **llama70b),
    ]


# ---------------------------------------------------------------------------------------------- child
def _rss_after_trim() -> int:
    """RSS once freed memory is handed back to the OS: what live objects still hold.

    glibc keeps freed heap blocks mapped (RSS counts them) until ``malloc_trim``; the difference
    to the RSS before the trim is the allocator's cache, not memory ``convert`` still uses.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status_bytes("VmRSS")


@contextmanager
def timed_phases(record: dict[str, dict[str, float]]) -> Iterator[None]:
    """Time the engine's steps and take each one's peak RSS; restore the engine on exit.

    ``run_probe`` runs twice per conversion: first on the original model, then on the converted one.
    """
    from lightning_approxbp.conversion import engine

    running: list[str] = []  # a phase that runs inside another (the block checks convert a copy) is the outer's

    def wrap(owner: Any, attribute: str, name: Callable[[], str]) -> Callable[..., Any]:
        original = getattr(owner, attribute)

        def measured(*args: Any, **kwargs: Any) -> Any:
            if running:
                return original(*args, **kwargs)
            phase = name()
            running.append(phase)
            reset_peak_rss()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                running.pop()
                entry = record.setdefault(phase, {"seconds": 0.0, "peak_rss_bytes": 0})
                entry["seconds"] += time.perf_counter() - start
                entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], proc_status_bytes("VmHWM"))

        return measured

    def probe_phase() -> str:
        return "converted probe" if "reference probe" in record else "reference probe"

    patches = [
        (engine._Conversion, "collect", lambda: "collect"),
        (engine._Conversion, "apply", lambda: "apply"),
        (engine._Conversion, "verify", lambda: "verify"),
        (engine._Conversion, "prepare_block_checks", lambda: "block checks"),
        (engine._Conversion, "verify_blocks", lambda: "block checks"),
        (engine, "run_probe", probe_phase),
    ]
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patches]
    for owner, attribute, name in patches:
        setattr(owner, attribute, wrap(owner, attribute, name))
    try:
        yield
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)


def build(case: Case) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=case.hidden, intermediate_size=case.intermediate, num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads or case.heads, num_hidden_layers=case.layers, vocab_size=case.vocab, use_cache=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, case.dtype))  # built in its dtype: no fp32 copy on the way
    try:
        with torch.device(case.device):
            return LlamaForCausalLM(config).train()
    finally:
        torch.set_default_dtype(default)


def measure(case: Case) -> dict[str, Any]:
    """Build the case's model and convert it; time, memory and the conversion's outcome."""
    from lightning_approxbp import convert

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(case)
    build_s = time.perf_counter() - start
    tensors = [*model.parameters(), *model.buffers()]
    keys = list(model.state_dict())
    row: dict[str, Any] = {
        **asdict(case),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": 0 if case.device == "meta" else sum(t.numel() * t.element_size() for t in tensors),
        "build_s": build_s,
    }
    probe = None
    if case.probe:
        ids = torch.randint(case.vocab, (case.samples, case.tokens), generator=torch.Generator().manual_seed(0))
        probe = {"input_ids": ids, "labels": ids}
    phases: dict[str, dict[str, float]] = {}
    row["rss_before_bytes"] = proc_status_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    try:
        with timed_phases(phases):
            report = convert(model, probe)
    except Exception as error:  # noqa: BLE001 - a failure is a result here (the meta case)
        row["error"] = f"{type(error).__name__}: {error}"
        return row
    row["convert_s"] = time.perf_counter() - start
    row["peak_rss_bytes"] = max([proc_status_bytes("VmHWM"), *(p["peak_rss_bytes"] for p in phases.values())])
    row["state_dict_keys_unchanged"] = list(model.state_dict()) == keys
    row["rss_after_bytes"] = proc_status_bytes("VmRSS")
    row["rss_after_trim_bytes"] = _rss_after_trim()
    row["phases"] = phases
    row["converted_modules"] = len(report.converted)
    row["probe_saved_bytes"] = report.bytes_before
    row["saved_bytes_reduction"] = report.reduction
    row["max_error"] = report.max_error
    row["fused_gated_mlps"] = sum("fused gated MLP" in r.strategy for r in report.converted)
    row["converted_norms"] = sum("Norm" in r.kind for r in report.converted)
    row["parameters_stay_meta"] = case.device != "meta" or all(p.is_meta for p in model.parameters())
    return row


# ---------------------------------------------------------------------------------------------- parent
def run_case(case: Case) -> dict[str, Any]:
    """Measure one case in a fresh process; add that process's own peak RSS."""
    child = run_child([sys.executable, __file__, "--child", json.dumps(asdict(case))], timeout_s=TIMEOUT_S)
    if child.returncode != 0:
        raise RuntimeError(f"case {case.name} failed ({child.returncode}):\n{child.output[-3000:]}")
    row = json.loads(next(line for line in child.output.splitlines() if line.startswith(CHILD_LINE))[len(CHILD_LINE):])
    row["process_max_rss_bytes"] = child.max_rss_bytes
    row["process_wall_s"] = child.wall_s
    return row


def render(payload: Payload) -> str:
    machine, rows, load = payload["machine"], payload["results"], payload["load_average"]
    widths = {(r["hidden"], r["intermediate"], r["heads"]) for r in rows}
    lines = [
        "# Conversion cost: setup time and peak host memory of `convert`",
        "",
        f"Machine: **{machine}**, load average {load} when it started (other jobs may have run at the same "
        "time, so times are upper bounds). Generated by `python benchmarks/conversion_cost.py`. `LlamaForCausalLM` "
        "with " + ", ".join(f"hidden {h}, intermediate {i}, {n} heads" for h, i, n in sorted(widths))
        + "; probe with labels (as the `ApproxBP` callback runs it); each case in a fresh process.",
        "",
    ]
    done = [r for r in rows if "error" not in r]
    times, memory = [], []
    for row in done:
        probe = f"{row['samples']} x {row['tokens']}" if row["probe"] else "none"
        other = row["convert_s"] - sum(p["seconds"] for p in row["phases"].values())
        times.append([row["name"], f"{row['parameters'] / 1e6:,.1f} M", probe,
                      *("-" if p not in row["phases"] else f"{row['phases'][p]['seconds']:.2f}" for p in PHASES),
                      f"{other:.2f}", f"{row['convert_s']:.2f}", row["fused_gated_mlps"], row["converted_norms"]])
        base = row["rss_before_bytes"]
        memory.append([
            row["name"], f"{row['model_bytes'] / MiB:,.0f}", f"{base / MiB:,.0f}",
            *("-" if p not in row["phases"] else f"+{(row['phases'][p]['peak_rss_bytes'] - base) / MiB:,.0f}" for p in PHASES),
            f"+{(row['peak_rss_bytes'] - base) / MiB:,.0f}", f"{(row['rss_after_bytes'] - base) / MiB:+,.0f}",
            f"{(row['rss_after_trim_bytes'] - base) / MiB:+,.0f}", f"{row['process_max_rss_bytes'] / MiB:,.0f}",
        ])
    lines += [
        *section("Time per phase of `convert` (seconds)"),
        *table(["case", "parameters", "probe", *PHASES, "other", "total", "fused MLPs", "converted norms"], times),
        "",
        *section("Host memory (MiB)",
                 "RSS before = the process with the model built, before `convert`; per phase: its peak RSS above that "
                 "(glibc keeps freed blocks, so a phase's peak includes what earlier phases freed but the allocator "
                 "kept); after `malloc_trim`: the RSS once the allocator returned freed memory, i.e. what is still in use."),
        *table(["case", "model", "RSS before", *PHASES, "peak of convert", "after convert", "after `malloc_trim`",
                "process peak"], memory),
    ]
    curve = sorted((r for r in done if r["name"].startswith("llama7b-bf16-")), key=lambda r: r["layers"])
    if len(curve) > 1:
        lines += [
            "",
            "## Growth with depth (LLaMA-7B widths, bf16, real weights)",
            "",
            ", ".join(f"{r['layers']} layers {r['convert_s']:.1f} s" for r in curve)
            + f": {curve[-1]['layers']} layers take {curve[-1]['convert_s'] / curve[0]['convert_s']:.2f}x the time of "
            f"{curve[0]['layers']} (target: at most 1.5x).",
        ]
    meta = [r for r in done if r["device"] == "meta"]
    for row in meta:
        lines += [
            "",
            f"`{row['name']}` ({row['layers']} layers, {row['parameters'] / 1e9:.1f} B parameters on the meta device): "
            f"{row['convert_s']:.1f} s, process peak RSS {row['process_max_rss_bytes'] / 2**30:.2f} GiB; "
            f"{row['fused_gated_mlps']} fused gated MLPs, {row['converted_norms']} converted norms; parameters "
            f"still on meta: {row['parameters_stay_meta']}; state-dict keys unchanged: {row['state_dict_keys_unchanged']}.",
        ]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Cases that did not convert", ""]
        lines += [f"- `{r['name']}` ({r['layers']} layers, {r['device']}): {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arguments(__doc__, "toy widths; print, do not write")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one case, print JSON
    args = parser.parse_args()
    if args.child is not None:
        print(CHILD_LINE + json.dumps(measure(Case(**json.loads(args.child)))))
        return
    load = load_average(" / ")
    rows = [run_case(case) for case in cases(args.quick)]
    payload = {"machine": machine_name(torch.device("cpu")), "quick": args.quick, "load_average": load, "results": rows}
    publish(RESULT, payload, render, out_folder(args.out, args.quick))


if __name__ == "__main__":
    main()
