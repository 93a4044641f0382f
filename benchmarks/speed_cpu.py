"""CPU training-step time: ApproxBP vs exact backprop (and gradient checkpointing), fp32 and bf16-mixed, one run.

Two models built from configs: a BERT-base-sized encoder (2 layers at true width 768) and a
LLaMA-shaped decoder (1 layer, hidden 1024, intermediate 2816), each on 4 x 128 tokens, train mode,
under two precisions:

- ``32-true``: fp32 throughout;
- ``bf16-mixed``: the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as Lightning's
  ``bf16-mixed`` runs it (what ``precision: auto`` picks on a CPU with native bf16).

One training step = forward, loss (mean square of the last hidden state), backward and an AdamW
step. Each variant has its own copy of the same initial weights and its own optimizer:

- ``baseline``: exact backprop;
- ``approxbp``: ``lightning_approxbp.convert(model, batch)`` (2-bit fitted activations,
  memory-sharing norms with merged affines, fused gated MLP, mask-free dropout); under
  ``bf16-mixed`` also the module changes of ``ApproxBPPrecision`` (trainable linears cast their
  weight again in backward instead of keeping autocast's copy), as the main job runs it; its ops
  run the native CPU kernels where a C compiler built them (the default on CPU);
- ``approxbp_torch``: the same converted model with ``use_backend("torch")``: the pure-PyTorch path;
- ``checkpoint``: transformers gradient checkpointing (a peer: recomputes the forward).

The CPU may be shared, so the variants are timed interleaved: every round runs one step of each
variant in a rotated order; each variant's time is the median over rounds, and the reported ratio
is the median of the per-round ratios (variant / baseline of the same round). Both precisions and
both models run in this one process, one after the other. The results name the CPU, whether it
computes bf16 natively (``avx512_bf16`` / ``amx_bf16``; without it bf16 is emulated and slower
than fp32) and the load average before and after.

    python benchmarks/speed_cpu.py            # writes results/speed_cpu.{json,md}
    python benchmarks/speed_cpu.py --quick    # toy widths, 1 round, prints only (or --out DIR)
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from typing import Any

import torch
from _common import cpuinfo, machine_name
from _harness.models import TOY_ENCODER, TOY_LLAMA
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import document, table
from _harness.targets import TargetRow
from _harness.variants import enable_checkpointing
from torch import Tensor, nn

from lightning_approxbp import convert
from lightning_approxbp.ops import use_backend
from lightning_approxbp.ops.native_cpu import native_available
from lightning_approxbp.plugins import recast_trainable_weights, store_frozen_weights

VARIANTS: tuple[str, ...] = ("baseline", "approxbp", "approxbp_torch", "checkpoint")
PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed")
TARGET = 1.05  # approxbp step time / baseline step time (issue 19)
VOCAB = 1000
RESULT = "speed_cpu"
LLAMA_WIDTH = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16}


def cpu_capability() -> dict[str, Any]:
    """What decides bf16 speed on this CPU: torch's vector ISA and the native bf16 flags."""
    flags = (cpuinfo("flags") or "").split()
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "native_kernels": native_available(),
        "torch": torch.__version__,
    }


def build_models(quick: bool) -> list[tuple[str, nn.Module, dict[str, Tensor]]]:
    """(name, model, batch) for the BERT-base-sized and LLaMA-shaped models, seeded."""
    import transformers as tf

    batch, seq = (2, 32) if quick else (4, 128)
    bert_width = TOY_ENCODER if quick else {}
    llama_width = TOY_LLAMA if quick else LLAMA_WIDTH
    specs = [
        ("BERT-base-sized (2 layers)", tf.BertModel, tf.BertConfig(num_hidden_layers=2, vocab_size=VOCAB, **bert_width)),
        ("LLaMA-shaped (1 layer, d=1024)", tf.LlamaModel, tf.LlamaConfig(num_hidden_layers=1, vocab_size=VOCAB, **llama_width)),
    ]
    models = []
    for name, cls, config in specs:
        torch.manual_seed(0)
        config._attn_implementation = "sdpa"
        kwargs = {"add_pooling_layer": False} if cls is tf.BertModel else {}
        models.append((name, cls(config, **kwargs).train(), {"input_ids": torch.randint(0, VOCAB, (batch, seq))}))
    return models


def autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def make_variant(model: nn.Module, batch: dict[str, Tensor], variant: str, precision: str) -> nn.Module:
    model = copy.deepcopy(model)
    if variant.startswith("approxbp"):
        # Probed and verified in fp32: under CPU autocast the verification compares a bf16
        # computation against a tolerance for the fp32 output and refuses the LLaMA conversion.
        convert(model, batch)
        if precision == "bf16-mixed":  # what ApproxBPPrecision("bf16-mixed") does to the module
            store_frozen_weights(model, torch.bfloat16)
            recast_trainable_weights(model)
    elif variant == "checkpoint":
        enable_checkpointing(model)
    return model


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], precision: str) -> None:
    with autocast(precision):
        hidden = model(**batch).last_hidden_state
    loss = hidden.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_interleaved(
    name: str, model: nn.Module, batch: dict[str, Tensor], precision: str, rounds: int, warmup: int
) -> dict[str, Any]:
    """Per-variant median step time (ms) and median per-round ratio to baseline."""
    models = {v: make_variant(model, batch, v, precision) for v in VARIANTS}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-5) for v, m in models.items()}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for index in range(warmup + rounds):
        order = VARIANTS[index % len(VARIANTS):] + VARIANTS[: index % len(VARIANTS)]
        for variant in order:
            torch.manual_seed(index)  # same dropout masks for every variant in a round
            start = time.perf_counter()
            with use_backend("torch" if variant == "approxbp_torch" else "auto"):
                training_step(models[variant], optimizers[variant], batch, precision)
            if index >= warmup:
                samples[variant].append((time.perf_counter() - start) * 1e3)
    base = samples["baseline"]
    row: dict[str, Any] = {"precision": precision, "model": name, "tokens": batch["input_ids"].numel(), "rounds": rounds}
    for variant in VARIANTS:
        row[f"{variant}_ms"] = statistics.median(samples[variant])
        row[f"{variant}_ratio"] = statistics.median(s / b for s, b in zip(samples[variant], base))
    row["met"] = row["approxbp_ratio"] <= TARGET
    return row


def render(payload: Payload) -> str:
    cpu, load = payload["cpu"], payload["load_average"]
    native = "yes" if cpu["bf16_native"] else "no (emulated, slower than fp32)"
    return document([
        "# CPU training-step time (fp32 and bf16-mixed)",
        "",
        f"Machine: **{payload['machine']}**; torch {cpu['torch']} CPU capability {cpu['torch_cpu_capability']}; "
        f"native bf16: {native} (avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}, amx_bf16: "
        f"{'yes' if cpu['amx_bf16'] else 'no'}). Load average (1 min) {load['before']:.2f} before, {load['after']:.2f} "
        "after. Generated by `python benchmarks/speed_cpu.py`.",
        "Step = forward + backward + AdamW. Ratio = median over interleaved rounds of "
        "(variant / baseline in the same round). Under bf16-mixed, ApproxBP includes ApproxBPPrecision's "
        "recast linears (weights cast again in backward). ApproxBP runs its ops on the native CPU kernels "
        f"({'built here' if cpu.get('native_kernels') else 'not available here: PyTorch path'}); "
        "the PyTorch-path column is the same converted model with `use_backend(\"torch\")`.",
        "",
        *table(["precision", "model", "tokens", "rounds", "baseline ms", "ApproxBP ms", "ApproxBP ratio",
                f"target <= {TARGET:.2f}x", "ApproxBP, PyTorch path ratio", "checkpointing ms", "checkpointing ratio"],
               [[r["precision"], r["model"], r["tokens"], r["rounds"], f"{r['baseline_ms']:.0f}", f"{r['approxbp_ms']:.0f}",
                 f"{r['approxbp_ratio']:.3f}x", "met" if r["met"] else "not met", _ratio(r.get("approxbp_torch_ratio")),
                 f"{r['checkpoint_ms']:.0f}", f"{r['checkpoint_ratio']:.3f}x"] for r in payload["results"]]),
    ])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def readme_targets(payload: Payload | None) -> list[TargetRow]:
    """Issue 19: ApproxBP's step time over exact backprop's, per model and precision."""
    if payload is None:
        return [TargetRow(f"CPU step time: <= {TARGET:.2f}x baseline")]
    return [TargetRow(f"CPU step time, {r['model']}, {r.get('precision', '32-true')}: <= {payload['target']:.2f}x "
                      "baseline", f"{r['approxbp_ratio']:.3f}x", payload["machine"], r["met"]) for r in payload["results"]]


def readme_section(payload: Payload | None) -> list[str]:
    if payload is None:
        return []
    rows = [[r.get("precision", "32-true"), r["model"], f"{r['baseline_ms']:.0f}", f"{r['approxbp_ratio']:.3f}x",
             f"{r['checkpoint_ratio']:.3f}x"] for r in payload["results"]]
    native = payload.get("cpu", {}).get("bf16_native")
    bf16 = "" if native is None else f"; native bf16: {'yes' if native else 'no'}"
    return [
        f"### CPU training-step time ({payload['machine']}{bf16}; interleaved medians)",
        "",
        *table(["precision", "model", "baseline ms", "ApproxBP", "gradient checkpointing"], rows),
        "",
    ]


def main() -> None:
    parser = arguments(__doc__, "toy widths, 1 round")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--precision", choices=PRECISIONS, action="append", help="only this precision (repeatable)")
    args = parser.parse_args()
    rounds, warmup = (1, 0) if args.quick else (args.rounds, 2)
    load_before = os.getloadavg()[0]
    rows = [
        time_interleaved(name, model, batch, precision, rounds, warmup)
        for precision in (args.precision or PRECISIONS)
        for name, model, batch in build_models(args.quick)
    ]
    payload = {
        "machine": machine_name(torch.device("cpu")), "cpu": cpu_capability(),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]}, "quick": args.quick, "target": TARGET,
        "precisions": list(args.precision or PRECISIONS), "results": rows,
    }
    publish(RESULT, payload, render, out_folder(args.out, args.quick))


if __name__ == "__main__":
    main()
