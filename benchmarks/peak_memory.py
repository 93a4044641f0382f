"""Whole-step peak memory, simulated on CPU: weights, gradients, optimizer state, activations, temporaries.

One steady-state training step (forward, loss, backward, optimizer step) is replayed on fake
tensors by :func:`lightning_approxbp.memory.estimate_step_memory` (``MemTracker`` under
``FakeTensorMode``; nothing is allocated), for:

- ViT-B/16 full fine-tuning, batch 64 at 224 px, bf16-mixed, AdamW (``ViTForImageClassification``);
- a LLaMA-7B-shaped model with 2 layers (vocabulary 32000), LoRA r=16 on q/v (peft), 2 x 2048
  tokens, bf16-mixed, AdamW;
- BERT-base full fine-tuning, batch 32 x 512 tokens, bf16-mixed, AdamW.

Variants: ``baseline``; ``paper`` (``ConversionConfig(table="paper", gated_mlp=False,
dropout=False, share_norm_output=False)``); ``default`` (``ConversionConfig()``); ``checkpoint``
(baseline with every block checkpointed, non-reentrant, as ``gradient_checkpointing_enable``
does); ``default + fused loss`` (causal LM only: ``ConversionConfig(fused_loss=True)``, the head
and loss through the fused linear + cross-entropy, as the callback's ``fused_loss="auto"`` does
for a training step that uses only the loss); ``budget`` rows: the default conversion plus :func:`~lightning_approxbp.memory.plan_checkpointing`
for budgets a quarter, half and three quarters of the way from the default's peak down to its
smallest reachable peak. Each budget row checks itself: the planned peak is at most the budget
and the plan with one block fewer is above it.

Two views of attention: ``eager`` (transformers' eager attention: saves the s x s probabilities)
and ``flash`` (what flash / memory-efficient attention keeps on a GPU: q, k, v, output and the
log-sum-exp; see ``_gpu_attention.py``). Random init from configs; no weights are downloaded.

    python benchmarks/peak_memory.py            # writes results/peak_memory_sim.{json,md}
    python benchmarks/peak_memory.py --quick    # toy widths, into --out DIR (or prints only)
    python benchmarks/peak_memory.py --models "LLaMA-7B-shaped LoRA"  # re-measure one model, keep the others' rows
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

import _gpu_attention
import torch
from _common import machine_name
from _harness.models import LLAMA_7B, TOY_ENCODER, TOY_LLAMA
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import table
from _harness.variants import PAPER_OPTIONS
from torch import nn

from lightning_approxbp import ConversionConfig
from lightning_approxbp.memory import StepSimulation, blocks_of, format_bytes
from lightning_approxbp.memory.planner import plan_for

RESULT = "peak_memory_sim"
VIEWS = {"eager": "eager", "flash": _gpu_attention.NAME}
PAPER = ConversionConfig(table="paper", **PAPER_OPTIONS)
MODELS = ("ViT-B/16", "LLaMA-7B-shaped LoRA", "BERT-base")
CAUSAL_LMS = ("LLaMA-7B-shaped LoRA",)
BUDGET_POINTS = (0.25, 0.5, 0.75)  # of the way from the default's peak to its smallest reachable
TARGETS = {("ViT-B/16", "flash"): 0.65, ("ViT-B/16", "eager"): 0.75}  # default / baseline peak


def build(name: str, view: str, quick: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers as tf

    torch.manual_seed(0)
    small = {**TOY_ENCODER, "num_hidden_layers": 3} if quick else {}
    attention = {"attn_implementation": VIEWS[view]}
    if name == "ViT-B/16":
        size, batch = (32, 16) if quick else (224, 64)
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=size, num_labels=10, **small, **attention))
        return model, {"pixel_values": torch.randn(batch, 3, size, size), "labels": torch.randint(0, 10, (batch,))}
    if name == "BERT-base":
        batch, seq = (8, 64) if quick else (32, 512)
        model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **small, **attention))
        return model, {"input_ids": torch.randint(0, 1000, (batch, seq)), "labels": torch.randint(0, 2, (batch,))}
    from peft import LoraConfig, get_peft_model

    width = TOY_LLAMA if quick else LLAMA_7B
    config = tf.LlamaConfig(num_hidden_layers=2, vocab_size=1000 if quick else 32000, use_cache=False, **width, **attention)
    model = get_peft_model(tf.LlamaForCausalLM(config), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, config.vocab_size, (2, 64 if quick else 2048))
    return model, {"input_ids": ids, "labels": ids}


def row(name: str, view: str, variant: str, simulation: StepSimulation, blocks: tuple[str, ...] = ()) -> dict[str, Any]:
    estimate = simulation.measure(blocks)
    return {"model": name, "attention": view, "variant": variant, "peak_bytes": estimate.peak_bytes,
            "parts": estimate.parts, "phase": estimate.phase, "module": estimate.module,
            "checkpointed_blocks": len(blocks)}


def measure_case(name: str, view: str, quick: bool) -> list[dict[str, Any]]:
    print(f"{name}, {view} attention ...", file=sys.stderr, flush=True)
    model, batch = build(name, view, quick)
    options = {"precision": "bf16-mixed", "optimizer": "adamw"}
    every = tuple(block for block, _ in blocks_of(model))
    baseline = StepSimulation(model, batch, **options)
    rows = [row(name, view, "baseline", baseline), row(name, view, "checkpoint", baseline, every)]
    rows.append(row(name, view, "paper", StepSimulation(model, batch, convert=PAPER, **options)))
    default = StepSimulation(model, batch, convert=ConversionConfig(), **options)
    rows.append(row(name, view, "default", default))
    if name in CAUSAL_LMS:
        fused = StepSimulation(model, batch, convert=ConversionConfig(fused_loss=True), **options)
        rows.append(row(name, view, "default + fused loss", fused))
    top, bottom = default.measure().peak_bytes, default.measure(every).peak_bytes
    for point in BUDGET_POINTS:
        budget = int(top - point * (top - bottom))
        plan = plan_for(default, budget)
        rows.append({
            **row(name, view, f"default + budget {format_bytes(budget)}", default, plan.blocks),
            "budget_bytes": budget, "blocks": list(plan.blocks), "recompute_flops": plan.recompute_flops,
            "forward_flops": plan.forward_flops, "one_fewer_peak_bytes": plan.one_fewer_peak_bytes,
            "fits": plan.after.peak_bytes <= budget,
            "fewest": plan.one_fewer_peak_bytes is None or plan.one_fewer_peak_bytes > budget,
        })
    return rows


def render(payload: Payload) -> str:
    lines = [
        "# Whole-step peak memory, simulated (CPU, fake tensors)", "",
        (f"Machine: {payload['machine']}; load average {payload['load_average']} (start) / "
        f"{payload['load_average_end']} (end); {payload['wall_s']:.0f} s. One steady-state bf16-mixed AdamW step; "
        "CUDA context, library workspaces and allocator caching are not included. In the flash view the backward "
        "recomputes one layer's attention with CPU sdpa, so its temporaries can include that layer's s x s scores "
        "(math path), which a flash backward does not materialise (an overestimate of the flash peak when the peak "
        "is in the backward)."), "",
        *([(f"This run measured {', '.join(payload['measured'])}; the other models' rows are kept from an earlier "
            "run (the figures are simulated, so they do not depend on the machine or its load)."), ""]
          if set(payload.get("measured", MODELS)) != set(MODELS) else []),
    ]
    base = {(r["model"], r["attention"]): r["peak_bytes"] for r in payload["results"] if r["variant"] == "baseline"}
    cells = []
    for r in payload["results"]:
        ratio = r["peak_bytes"] / base[(r["model"], r["attention"])]
        check = "" if "fits" not in r else ("ok" if r["fits"] and r["fewest"] else "FAILED")
        cells.append([r["model"], r["attention"], r["variant"], format_bytes(r["peak_bytes"]), f"{ratio:.2f}x",
                      format_bytes(r["parts"]["activations"]), format_bytes(r["parts"]["temporaries"]), r["phase"],
                      r["checkpointed_blocks"], check])
    lines += table(["model", "attention", "variant", "peak", "vs baseline", "activations", "temporaries", "peak in",
                    "blocks", "check"], cells,
                   right_aligned={"peak", "vs baseline", "activations", "temporaries", "blocks"})
    lines += ["", "Targets (default / baseline peak): " + ", ".join(
        f"{m} {v} <= {limit}: {payload['targets'][f'{m} {v}']:.2f}x" for (m, v), limit in TARGETS.items()
        if f"{m} {v}" in payload["targets"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arguments(__doc__, "toy widths (CI)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models to measure; the rows of the others are kept from the results in the output folder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Module is None")
    _gpu_attention.register()
    out = out_folder(args.out, args.quick)
    kept: list[dict[str, Any]] = []
    if set(args.models) != set(MODELS):
        if out is None or not (out / f"{RESULT}.json").exists():
            parser.error("--models keeps the other models' rows from an earlier run: pass --out DIR holding one")
        kept = json.loads((out / f"{RESULT}.json").read_text())["results"]
    start, load = time.perf_counter(), os.getloadavg()
    measured = {name: [r for view in VIEWS for r in measure_case(name, view, args.quick)] for name in args.models}
    rows = [r for name in MODELS for r in (measured[name] if name in measured else [k for k in kept if k["model"] == name])]
    peaks = {(r["model"], r["attention"], r["variant"]): r["peak_bytes"] for r in rows}
    targets = {f"{m} {v}": peaks[(m, v, "default")] / peaks[(m, v, "baseline")] for m, v in TARGETS}
    payload = {"machine": machine_name(torch.device("cpu")), "load_average": [round(x, 2) for x in load],
               "load_average_end": [round(x, 2) for x in os.getloadavg()], "wall_s": time.perf_counter() - start,
               "quick": args.quick, "measured": list(args.models), "results": rows, "targets": targets}
    publish(RESULT, payload, render, out)
    failed = [r["variant"] for r in rows if "fits" in r and not (r["fits"] and r["fewest"])]
    if not args.quick:
        failed += [key for key, ratio in targets.items() if ratio > TARGETS[tuple(key.rsplit(" ", 1))]]
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
