"""End-to-end Lightning training on one GPU: peak memory and throughput, all variants in one run.

Two workloads, each trained for a few steps with a Lightning ``Trainer`` per variant, in one
process (weights from the same seed, synthetic data, one batch repeated):

- **ViT-B/16 full fine-tuning**: ``ViTForImageClassification`` from ``ViTConfig()`` (true
  width, 12 layers, 224 px, 100 classes), ``precision="bf16-mixed"``, batch 64, AdamW.
  Variants: ``baseline``; ``approxbp`` (:class:`~lightning_approxbp.ApproxBP` callback,
  defaults: 2-bit fitted GELU, memory-sharing LayerNorms with merged affines);
  ``approxbp-keep`` (``ApproxBP(affine="keep")``: affines kept, normalised value recovered
  from the output in backward, the semantics of apex ``memory_efficient=True``); and
  ``checkpoint`` (transformers gradient checkpointing, non-reentrant).
- **LLaMA-shaped LoRA**: ``LlamaForCausalLM`` at LLaMA-7B width (hidden 4096, intermediate
  11008, 32 heads, vocab 32000) with 8 layers, peft LoRA r=16 on every projection, batch 4 x 1024
  tokens, causal-LM loss, ``bf16-mixed``. Variants: ``baseline``; ``approxbp`` (ApproxBP callback
  plus :class:`~lightning_approxbp.plugins.ApproxBPPrecision`, which stores the frozen weights in
  bf16 so no per-step bf16 weight copy is saved); ``checkpoint``; and ``liger`` (Liger-Kernel's
  RMSNorm + SwiGLU + RoPE, only if ``liger_kernel`` is importable; run last because Liger patches
  transformers' module classes globally).

Per variant: the peak of ``torch.cuda.max_memory_allocated`` over the timed steps (reset after
the warm-up steps; it includes weights, gradients and optimizer state) and the median step time
(CUDA-synchronised at every step boundary) as samples/s. A variant that fails (e.g. out of
memory) is recorded with its error and the run goes on. Target (issue 5): ApproxBP on ViT-B at
least 25% lower peak memory at >= 0.97x baseline throughput.

Without a CUDA device the script prints a message and exits with status 0; ``--smoke`` runs the
same code at toy sizes on CPU (no peak memory there) so that it cannot rot.

    python benchmarks/gpu_training.py            # on a GPU machine: writes results/gpu_training_cuda.{json,md}
    python benchmarks/gpu_training.py --smoke    # any machine, toy sizes, prints only (or --out DIR)
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import machine_name, machine_slug, quiet_trainer
from _harness.models import LLAMA_7B, TOY_LLAMA
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import document, generated_by, table
from _harness.targets import TargetRow
from _harness.variants import CONVERSIONS, enable_checkpointing
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_approxbp import ApproxBP
from lightning_approxbp.plugins.precision import ApproxBPPrecision

# The README's results: a GPU run (a --smoke run on a CPU writes gpu_training_cpu, toy figures).
RESULT = "gpu_training_cuda"
PRECISION = "bf16-mixed"
TARGET_MEMORY_REDUCTION = 0.25  # ViT-B full fine-tuning, approxbp vs baseline
TARGET_THROUGHPUT = 0.97
LIGER_AVAILABLE = importlib.util.find_spec("liger_kernel") is not None


class StepMonitor(Callback):
    """Times every training step (synchronised) and records the peak memory after warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.step_seconds: list[float] = []
        self.peak_bytes: int | None = None
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.step_seconds.append(time.perf_counter() - self._start)
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()


class RepeatedBatch(LightningDataModule):
    """One batch, ``length`` times: a datamodule, so the ApproxBP callback finds its probe batch."""

    def __init__(self, batch: Any, length: int) -> None:
        super().__init__()
        self.batch = batch
        self.length = length

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.length, batch_size=None)


class TrainingModule(LightningModule):
    """The model's own loss on a batch of its keyword inputs; AdamW on the trainable parameters (LoRA: the adapters)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@dataclass
class Workload:
    """A model factory, one repeated batch, and the variants to run on it."""

    name: str
    build: Callable[[], LightningModule]
    batch: Any
    samples: int
    tokens: int
    variants: list[str] = field(default_factory=list)


def vit_workload(smoke: bool) -> Workload:
    from transformers import ViTConfig, ViTForImageClassification

    size, batch = (32, 4) if smoke else (224, 64)
    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 1} if smoke else {}
    config = ViTConfig(image_size=size, num_labels=100, **small)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = ViTForImageClassification(config)
    inputs = {"pixel_values": torch.randn(batch, 3, size, size), "labels": torch.randint(0, 100, (batch,))}
    tokens = batch * ((size // config.patch_size) ** 2 + 1)
    variants = ["baseline", "approxbp", "approxbp-keep", "checkpoint"]
    build = lambda: TrainingModule(copy.deepcopy(base), lr=1e-5)  # noqa: E731
    return Workload("ViT-B/16 full fine-tuning", build, inputs, batch, tokens, variants)


def llama_lora_workload(smoke: bool) -> Workload:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        width = {**TOY_LLAMA, "num_hidden_layers": 1, "vocab_size": 1000}
        batch, seq = 2, 32
    else:
        width = {**LLAMA_7B, "num_hidden_layers": 8, "vocab_size": 32000}
        batch, seq = 4, 1024
    config = LlamaConfig(**width)
    config._attn_implementation = "sdpa"
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def build() -> LightningModule:
        torch.manual_seed(0)
        return TrainingModule(get_peft_model(LlamaForCausalLM(config), lora), lr=1e-4)

    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    variants = ["baseline", "approxbp", "checkpoint"] + (["liger"] if LIGER_AVAILABLE else [])
    name = f"LLaMA-7B-shaped LoRA ({config.num_hidden_layers} layers)"
    return Workload(name, build, {"input_ids": input_ids, "labels": input_ids}, batch, batch * seq, variants)


def configure(module: LightningModule, variant: str) -> tuple[list[Callback], Any]:
    """Callbacks and precision (string or plugin) that make ``module`` the given variant."""
    inner = getattr(module.model, "base_model", module.model)
    if variant == "checkpoint":
        enable_checkpointing(getattr(inner, "model", inner))
    elif variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=getattr(inner, "model", inner))
    if variant == "approxbp" and not all(p.requires_grad for p in module.parameters()):  # LoRA: frozen weights in bf16
        return [ApproxBP()], ApproxBPPrecision(PRECISION)
    if variant == "approxbp":
        return [ApproxBP()], PRECISION
    if variant == "approxbp-keep":
        return [ApproxBP(**CONVERSIONS["keep"])], PRECISION
    return [], PRECISION


def run_variant(workload: Workload, variant: str, warmup: int, steps: int, accelerator: str) -> dict[str, Any]:
    """Train one variant; its model and trainer are freed before the next variant starts."""
    row: dict[str, Any] = {"workload": workload.name, "variant": variant}
    try:
        row.update(_fit(workload, variant, warmup, steps, accelerator))
    except Exception as err:  # noqa: BLE001 - one failing variant (e.g. OOM) must not lose the others
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    # Trainer and LightningModule reference each other: collect the cycle now, or the previous
    # variant's weights would still be allocated during the next variant's peak measurement.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _fit(workload: Workload, variant: str, warmup: int, steps: int, accelerator: str) -> dict[str, Any]:
    module = workload.build()
    callbacks, precision = configure(module, variant)
    plugins = [precision] if isinstance(precision, ApproxBPPrecision) else []
    monitor = StepMonitor(warmup)
    trainer = quiet_trainer(accelerator=accelerator, precision=None if plugins else precision, plugins=plugins,
                            max_steps=warmup + steps, callbacks=[*callbacks, monitor], limit_val_batches=0)
    trainer.fit(module, datamodule=RepeatedBatch(workload.batch, warmup + steps))
    step = statistics.median(monitor.step_seconds)
    result: dict[str, Any] = {"step_ms": 1e3 * step, "samples_per_s": workload.samples / step,
                              "tokens_per_s": workload.tokens / step, "peak_bytes": monitor.peak_bytes}
    report = callbacks[0].report if callbacks and isinstance(callbacks[0], ApproxBP) else None
    if report is not None:
        result["converted_modules"] = len(report.converted)
    return result


def compare(rows: list[dict[str, Any]]) -> None:
    """Add memory reduction and throughput ratio against each workload's baseline."""
    base = {r["workload"]: r for r in rows if r["variant"] == "baseline" and "error" not in r}
    for row in rows:
        ref = base.get(row["workload"])
        if ref is None or "error" in row:
            continue
        row["throughput_ratio"] = row["samples_per_s"] / ref["samples_per_s"]
        if row["peak_bytes"] is not None and ref["peak_bytes"]:
            row["memory_reduction"] = 1.0 - row["peak_bytes"] / ref["peak_bytes"]


def target(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    match = [r for r in rows if r["workload"].startswith("ViT") and r["variant"] == "approxbp" and "memory_reduction" in r]
    if not match:
        return None
    r = match[0]
    met = r["memory_reduction"] >= TARGET_MEMORY_REDUCTION and r["throughput_ratio"] >= TARGET_THROUGHPUT
    return {"memory_reduction": r["memory_reduction"], "throughput_ratio": r["throughput_ratio"], "met": met}


def _cells(r: dict[str, Any]) -> list[str]:
    """A variant's cells: workload, variant, peak GiB, vs baseline, samples/s, throughput vs baseline, note (or error)."""
    if "error" in r:
        return [r["workload"], r["variant"], "-", "-", "-", "-", r["error"]]
    peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
    reduction = f"{-100 * r['memory_reduction']:+.1f}%" if "memory_reduction" in r else "-"
    ratio = f"{r['throughput_ratio']:.3f}x" if "throughput_ratio" in r else "-"
    note = f"{r['converted_modules']} modules converted" if "converted_modules" in r else ""
    return [r["workload"], r["variant"], peak, reduction, f"{r['samples_per_s']:.1f}", ratio, note]


def render(payload: Payload) -> str:
    rows, goal = payload["results"], payload["target"]
    lines = [
        "# End-to-end Lightning training on GPU",
        "",
        generated_by(payload, "gpu_training.py", "smoke")
        + (" (toy sizes on CPU: not a result)." if payload["smoke"] else "."),
        f"Precision {PRECISION}; peak = torch.cuda.max_memory_allocated over the timed steps; throughput from the "
        f"median step time. Liger-Kernel: {'installed' if LIGER_AVAILABLE else 'not installed (variant not run)'}.",
        "",
    ]
    lines += table(["workload", "variant", "peak memory (GiB)", "vs baseline", "samples/s", "throughput vs baseline",
                    "note"], [_cells(r) for r in rows])
    if goal is not None:
        lines += [
            "",
            f"Target (ViT-B/16, ApproxBP): >= {TARGET_MEMORY_REDUCTION:.0%} lower peak memory at >= {TARGET_THROUGHPUT}x "
            f"throughput. Measured: {goal['memory_reduction']:.1%} lower at {goal['throughput_ratio']:.3f}x: "
            f"**{'met' if goal['met'] else 'not met'}**.",
        ]
    return document(lines)


GOAL = (f"ViT-B/16 full fine-tuning on GPU: >= {TARGET_MEMORY_REDUCTION:.0%} lower peak memory at >= "
        f"{TARGET_THROUGHPUT}x throughput")


def readme_targets(payload: dict[str, Any] | None) -> list[TargetRow]:
    goal = (payload or {}).get("target")
    if goal:
        return [TargetRow(GOAL, f"{goal['memory_reduction']:.1%} lower, {goal['throughput_ratio']:.3f}x", payload["machine"],
                          goal["met"])]
    return [TargetRow(GOAL, "-", "no GPU run committed yet")]


def readme_section(payload: dict[str, Any] | None) -> list[str]:
    if payload is None:
        return ["### GPU training", "", "Not measured yet: `python benchmarks/gpu_training.py` needs a CUDA device.", ""]
    rows = [[r["workload"], r["variant"], r["error"], "", "", ""] if "error" in r else _cells(r)[:6]
            for r in payload["results"]]
    lines = [
        f"### GPU training ({payload['machine']}, {payload['precision']})",
        "",
        *table(["workload", "variant", "peak GiB", "vs baseline", "samples/s", "vs baseline"], rows),
    ]
    if not payload.get("liger_installed"):
        lines += ["", "Liger-Kernel was not installed on that machine, so its variant did not run."]
    return [*lines, ""]


def main() -> None:
    parser = arguments(__doc__, "toy sizes; runs on CPU too", short="smoke")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 3 warm-up steps)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_training.py: no CUDA device here; nothing measured. Run it on a GPU machine, or pass --smoke "
              "for a toy CPU run.")
        sys.exit(0)
    device = torch.device("cuda" if cuda else "cpu")
    warmup, steps = (0, 1) if args.smoke else (3, args.steps)

    rows = []
    for factory in (vit_workload, llama_lora_workload):
        try:
            workload = factory(args.smoke)
        except ModuleNotFoundError as err:  # e.g. peft not installed: run the other workload
            print(f"{factory.__name__}: skipped ({err})")
            continue
        for variant in workload.variants:
            rows.append(run_variant(workload, variant, warmup, steps, "gpu" if cuda else "cpu"))
            print(f"{workload.name} / {variant}: {rows[-1].get('error', 'ok')}", flush=True)
    compare(rows)
    payload = {"machine": machine_name(device), "smoke": args.smoke, "precision": PRECISION,
               "liger_installed": LIGER_AVAILABLE, "target": target(rows), "results": rows}
    publish(f"gpu_training_{machine_slug(device)}", payload, render, out_folder(args.out, args.smoke))


if __name__ == "__main__":
    main()
