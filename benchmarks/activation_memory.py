"""Activation memory of real transformer blocks: bytes saved for backward per token per block.

For ViT-B/16, BERT-base, RoBERTa-base, GPT-2, and LLaMA-7B-, Mistral-7B- and Qwen2-7B-shaped
layers (transformers models built from configs at their true widths, two layers, small vocab,
train mode with the configs' own dropout), under three precisions:

- ``32-true``: fp32 parameters and compute;
- ``bf16-mixed``: fp32 parameters, ``torch.autocast("cpu", torch.bfloat16)`` around the forward;
- ``bf16-true``: ``model.to(torch.bfloat16)``, no autocast;

and eight variants: ``baseline``; ``activations`` (Approx-BP alone); ``norms`` (MS-BP alone);
``paper`` (both techniques as published: ``convert(..., gated_mlp=False, dropout=False,
share_norm_output=False)``);
``both`` (the default ``convert(...)``: both techniques plus fused gated MLPs, which save only the
gate and up outputs with exact gradients, and dropouts that redraw their mask in backward instead
of saving it); ``keep`` (the default with every norm affine kept in the norm and
recovered from its output, i.e. NVIDIA apex's ``memory_efficient=True`` semantics:
``convert(..., affine="keep")``) and ``checkpoint`` (transformers ``gradient_checkpointing_enable``,
non-reentrant ``torch.utils.checkpoint``), and for the LLaMA family ``liger`` (Liger-Kernel's
RMSNorm and SwiGLU blocks, the strongest exact peer; see ``_liger.py`` for how they are counted
without a GPU; needs ``pip install liger-kernel``). The default also lets post-LN consumers (BERT,
RoBERTa) save the norm's fp32 output by reference instead of a bf16 copy each.
Conversion gets the benchmark batch as its probe, so norm affines merge into their consumers.

Two views of attention, because the machine decides what attention saves:

- ``cpu``: as run here (``sdpa``; with attention dropout, CPU takes the math path, which saves the
  ``s x s`` probabilities and the dropout mask);
- ``gpu`` (bf16-mixed only): attention counted the way flash / memory-efficient attention runs on
  a GPU: ``q``, ``k``, ``v``, the output and an fp32 log-sum-exp (see ``_gpu_attention.py``). The
  rest of the block is counted as run.

How the bytes are counted (device independent, exact, CPU):

- ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved for backward while the
  block runs; each storage is counted once (by ``lightning_approxbp.saved_tensors.storage_id``,
  as ``SavedTensorCounter`` counts), parameter storages are excluded (autograd references them,
  it does not copy them).
- Autocast weight copies are reported apart: a saved non-parameter storage of exactly the size
  of one of the block's parameters, whose shape is that parameter's shape or its transpose and
  whose dtype differs from it (the bf16 copy that autocast makes of an fp32 weight for a matmul).
  Activations never have a parameter's shape at the token counts used here (197 and 256).
- Storages saved before the block runs (by the block before it) are not the block's: a block
  that keeps a reference to its input which the previous block's norm saved adds nothing.
- Each saved storage is attributed to the innermost module running when it was first saved
  (forward pre/post hooks), and bucketed by that module's class: norm, activation, linear
  input, attention, dropout mask, other (e.g. the gated-MLP product, residual adds).
- With checkpointing the block saves nothing through these hooks; what stays alive is the
  block's tensor inputs, kept by the checkpoint for the recomputation. They are counted instead
  (bucket "checkpoint inputs"; rotary cos/sin tables included).

Bytes are divided by the number of tokens (197 = one 224 px image for ViT, 256 otherwise) and
also shown in units of the hidden size d ("bytes per token / d").

The causal LMs (GPT-2 and the LLaMA family) also get their LM head and loss counted, at their
true vocabularies, unfused and through the fused linear + cross-entropy (``fused_loss``; see
``_lm_head.py``), for a frozen head (LoRA) and a trainable one; and a whole-model figure per token:
the layer count of the real model times its block, plus the head and loss.

    python benchmarks/activation_memory.py            # writes results/activation_memory_cpu.{json,md,png}
    python benchmarks/activation_memory.py --quick    # toy widths, prints only (or --out DIR)
    python benchmarks/activation_memory.py --heads-only  # the head rows only, merged into the results in --out
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import multiprocessing
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_approxbp import convert
from lightning_approxbp.saved_tensors import storage_id
from torch import Tensor, nn

import _gpu_attention
import _liger
import _lm_head
from _common import machine_name
from _harness.records import Payload, arguments, out_folder, publish
from _harness.models import LLAMA_7B, TOY_ENCODER, TOY_LLAMA
from _harness.render import document, pivot, section, table
from _harness.targets import TargetRow
from _harness.variants import CONVERSIONS, dropout_as_on_cuda, enable_checkpointing

RESULT = "activation_memory_cpu"
PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "bf16-true")
VARIANTS: tuple[str, ...] = ("baseline", "activations", "norms", "paper", "both", "keep", "checkpoint", "liger")
ATTENTION_VIEWS: tuple[str, ...] = ("cpu", "gpu")
BUCKETS: tuple[str, ...] = ("norm", "activation", "linear input", "attention", "dropout mask", "other", "checkpoint inputs")
# bf16-mixed, both / baseline, (limit, attention view): issue 5 (ViT-B), issue 9 (the rest).
TARGETS: dict[str, tuple[float, str]] = {
    "ViT-B/16": (0.60, "cpu"),
    "BERT-base": (0.70, "gpu"),
    "RoBERTa-base": (0.70, "gpu"),
    "LLaMA-7B-shaped": (0.42, "cpu"),
    "Mistral-7B-shaped": (0.40, "cpu"),
    "Qwen2-7B-shaped": (0.42, "cpu"),
}
VOCAB = 1000
# Causal LMs whose head and loss are counted: the real model's vocabulary and number of layers.
CAUSAL_LMS: dict[str, tuple[int, int]] = {
    "GPT-2": (50257, 12),
    "LLaMA-7B-shaped": (32000, 32),
    "Mistral-7B-shaped": (32000, 32),
    "Qwen2-7B-shaped": (152064, 28),
}
# The whole-model rows: (block variant, head path).
MODEL_ROWS: tuple[tuple[str, str], ...] = (("baseline", "unfused"), ("both", "unfused"), ("both", "fused"))


@dataclass
class Workload:
    """A two-layer model, one input batch, its token count, hidden size and model family."""

    name: str
    model: nn.Module
    inputs: dict[str, Tensor]
    tokens: int
    hidden: int
    family: str


def measured_block(model: nn.Module) -> nn.Module:
    """The second transformer block (element 1 of the model's first ``nn.ModuleList``).

    Not the first: its input comes from the embeddings (in BERT through a dropout), while every
    other block's input is the previous block's output, as in all but one block of a real stack.
    """
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList))[1]


def _configs(quick: bool) -> dict[str, tuple[Any, type, str]]:
    """Model name -> (config, model class, family), at true width (toy width with ``quick``)."""
    import transformers as tf

    small = TOY_ENCODER if quick else {}

    def llama_like(cls: type, width: dict[str, int]) -> Any:
        return cls(num_hidden_layers=2, vocab_size=VOCAB, **(TOY_LLAMA if quick else width))

    configs = {
        "ViT-B/16": (tf.ViTConfig(num_hidden_layers=2, image_size=64 if quick else 224, **small), tf.ViTModel, "vit"),
        "BERT-base": (tf.BertConfig(num_hidden_layers=2, vocab_size=VOCAB, **small), tf.BertModel, "bert"),
        "RoBERTa-base": (tf.RobertaConfig(num_hidden_layers=2, vocab_size=VOCAB, **small), tf.RobertaModel, "bert"),
        "GPT-2": (tf.GPT2Config(n_layer=2, vocab_size=VOCAB, **({"n_embd": 64, "n_head": 4} if quick else {})),
                  tf.GPT2Model, "gpt2"),
        "LLaMA-7B-shaped": (llama_like(tf.LlamaConfig, LLAMA_7B), tf.LlamaModel, "llama"),
        "Mistral-7B-shaped": (llama_like(tf.MistralConfig, {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8}),
                              tf.MistralModel, "llama"),
        "Qwen2-7B-shaped": (llama_like(tf.Qwen2Config, {"hidden_size": 3584, "intermediate_size": 18944,
                                                        "num_attention_heads": 28, "num_key_value_heads": 4}),
                            tf.Qwen2Model, "llama"),
    }
    if quick:
        return {name: configs[name] for name in ("ViT-B/16", "BERT-base", "LLaMA-7B-shaped")}
    return configs


def build_workload(name: str, quick: bool) -> Workload:
    """One model, seeded, in train mode, with its input batch."""
    config, cls, family = _configs(quick)[name]
    _gpu_attention.register()
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    kwargs = {"add_pooling_layer": False} if family in ("vit", "bert") else {}
    model = cls(config, **kwargs).train()
    if family == "vit":
        size = config.image_size
        inputs = {"pixel_values": torch.randn(1, 3, size, size)}
        tokens = (size // config.patch_size) ** 2 + 1
    else:
        # RoBERTa's padding id is 1: keep it out of the batch so no position is masked.
        seq = 48 if quick else 256
        inputs, tokens = {"input_ids": torch.randint(2, VOCAB, (1, seq))}, seq
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return Workload(name, model, inputs, tokens, hidden, family)


def variants_of(workload: Workload) -> tuple[str, ...]:
    """Liger patches the LLaMA family only, and only when installed."""
    if workload.family == "llama" and _liger.available():
        return VARIANTS
    return tuple(v for v in VARIANTS if v != "liger")


def views_of(precision: str) -> tuple[str, ...]:
    return ATTENTION_VIEWS if precision == "bf16-mixed" else ("cpu",)


def measure_model(name: str, quick: bool, precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every precision, attention view and variant of one model (Liger last: it patches classes)."""
    workload = build_workload(name, quick)
    return [
        measure(workload, precision, variant, view)
        for precision in precisions
        for view in views_of(precision)
        for variant in variants_of(workload)
    ]


class BlockSaveRecorder:
    """Records what one block saves for backward, by storage, attributed to the saving module."""

    def __init__(self, block: nn.Module, checkpointed: bool) -> None:
        self.block = block
        self.checkpointed = checkpointed
        self.parameters = {storage_id(p) for p in block.parameters()}
        self.weight_shapes: dict[int, set[tuple[tuple[int, ...], torch.dtype]]] = {}
        for p in block.parameters():
            shapes = {(tuple(p.shape), p.dtype), (tuple(reversed(p.shape)), p.dtype)}
            self.weight_shapes.setdefault(p.numel(), set()).update(shapes)
        self.stack: list[nn.Module] = []
        self.seen: set[int] = set()
        self.buckets: dict[str, int] = dict.fromkeys(BUCKETS, 0)
        self.weight_copy_bytes = 0
        self.handles: list[Any] = []

    def _is_weight_copy(self, tensor: Tensor) -> bool:
        candidates = self.weight_shapes.get(tensor.untyped_storage().nbytes() // tensor.element_size(), set())
        return any(tuple(tensor.shape) == shape and tensor.dtype != dtype for shape, dtype in candidates)

    def _add(self, tensor: Tensor, bucket: str) -> None:
        key = storage_id(tensor)
        if key in self.seen or key in self.parameters:
            return
        self.seen.add(key)
        if self._is_weight_copy(tensor):
            self.weight_copy_bytes += tensor.untyped_storage().nbytes()
        else:
            self.buckets[bucket] += tensor.untyped_storage().nbytes()

    def _pack(self, tensor: Tensor) -> Tensor:
        if self.stack:
            self._add(tensor, bucket_of(self.stack[-1]))
        else:
            # Saved outside the block (by the block before it, e.g. its norm's output): the
            # block referencing it again costs nothing.
            self.seen.add(storage_id(tensor))
        # detached: an output kept as itself would form a cycle with its grad_fn that gc cannot
        # see, and the never-run graph (with the model copy's weights) would stay alive
        return tensor.detach()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.block and self.checkpointed and not self.stack and torch.is_grad_enabled():
            for value in [*args, *kwargs.values()]:
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, Tensor) and tensor.is_floating_point():
                        self._add(tensor, "checkpoint inputs")
        self.stack.append(module)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.stack.pop()

    def __enter__(self) -> BlockSaveRecorder:
        for module in self.block.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()


def bucket_of(module: nn.Module) -> str:
    """What kind of module holds a saved tensor, from its class name."""
    name = type(module).__name__.lower()
    if "norm" in name:
        return "norm"
    if any(key in name for key in ("act", "gelu", "silu", "step")):
        return "activation"
    if "linear" in name or name == "conv1d":
        return "linear input"
    if "attention" in name or "attn" in name:
        return "attention"
    if "dropout" in name:
        return "dropout mask"
    return "other"


def prepare(workload: Workload, precision: str, variant: str, view: str = "cpu") -> nn.Module:
    """A fresh copy of the model in ``precision`` and attention ``view``, changed per ``variant``."""
    model = copy.deepcopy(workload.model)
    model.config._attn_implementation = _gpu_attention.NAME if view == "gpu" else "sdpa"
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if variant == "checkpoint":
        enable_checkpointing(model)
    elif variant == "liger":
        _liger.apply(model, model.config.model_type)
    elif variant != "baseline":
        # "both" (both techniques and more) is this benchmark's name for the default conversion,
        # kept because the committed results and the README use it.
        convert(model, _cast_inputs(workload.inputs, precision), **CONVERSIONS["default" if variant == "both" else variant])
        if view == "gpu":
            dropout_as_on_cuda(model)
    return model


def _cast_inputs(inputs: dict[str, Tensor], precision: str) -> dict[str, Tensor]:
    if precision != "bf16-true":
        return inputs
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


def measure(workload: Workload, precision: str, variant: str, view: str = "cpu") -> dict[str, Any]:
    model = prepare(workload, precision, variant, view)
    inputs = _cast_inputs(workload.inputs, precision)
    torch.manual_seed(1)
    kernels = _liger.cpu_kernels() if variant == "liger" else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"), kernels:
        with BlockSaveRecorder(measured_block(model), checkpointed=variant == "checkpoint") as recorder:
            output = model(**inputs)
    del output, model
    gc.collect()  # the model copy sits in reference cycles; free it before the next variant
    per_token = {k: v / workload.tokens for k, v in recorder.buckets.items()}
    total = sum(per_token.values())
    return {
        "model": workload.name,
        "precision": precision,
        "attention": view,
        "variant": variant,
        "hidden": workload.hidden,
        "tokens": workload.tokens,
        "bytes_per_token": total,
        "bytes_per_token_over_d": total / workload.hidden,
        "buckets_per_token": per_token,
        "autocast_weight_copy_bytes": recorder.weight_copy_bytes,
    }


def ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``ratio``: each row's bytes over its model/precision/attention-view baseline."""
    key = lambda r: (r["model"], r["precision"], r["attention"])
    base = {key(r): r["bytes_per_token"] for r in rows if r["variant"] == "baseline"}
    for row in rows:
        row["ratio"] = row["bytes_per_token"] / base[key(row)]


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for model, (limit, view) in TARGETS.items():
        match = [r for r in rows if r["model"] == model and r["precision"] == "bf16-mixed" and r["variant"] == "both"
                 and r["attention"] == view]
        if match:
            ratio = match[0]["ratio"]
            results.append({"model": model, "attention": view, "ratio": ratio, "limit": limit, "met": ratio <= limit})
    return results


def head_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head and loss of every causal LM among ``rows`` (its hidden size and token count from them)."""
    results = []
    for model in dict.fromkeys(r["model"] for r in rows if r["model"] in CAUSAL_LMS):
        block = next(r for r in rows if r["model"] == model)
        for precision in dict.fromkeys(r["precision"] for r in rows if r["model"] == model):
            for head in _lm_head.HEADS:
                for path in _lm_head.PATHS:
                    measured = _lm_head.measure_head(block["hidden"], CAUSAL_LMS[model][0], block["tokens"],
                                                     precision, path, head)
                    results.append({"model": model, **measured})
    return results


def model_rows(rows: list[dict[str, Any]], heads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per token of a whole causal LM (bf16-mixed, frozen head): layers x block + head and loss."""
    results = []
    for model, (_vocab, layers) in CAUSAL_LMS.items():
        for view in ATTENTION_VIEWS:
            blocks = {r["variant"]: r for r in rows if r["model"] == model and r["precision"] == "bf16-mixed"
                      and r["attention"] == view}
            head = {h["path"]: h for h in heads if h["model"] == model and h["precision"] == "bf16-mixed"
                    and h["head"] == "frozen"}
            if not blocks or not head:
                continue
            for variant, path in MODEL_ROWS:
                block_bytes, head_bytes = layers * blocks[variant]["bytes_per_token"], head[path]["bytes_per_token"]
                results.append({"model": model, "attention": view, "layers": layers, "variant": variant, "head": path,
                                "hidden": blocks[variant]["hidden"], "bytes_per_token": block_bytes + head_bytes,
                                "head_share": head_bytes / (block_bytes + head_bytes)})
    for row in results:
        row["ratio"] = row["bytes_per_token"] / next(
            r["bytes_per_token"] for r in results if r["model"] == row["model"] and r["attention"] == row["attention"])
    return results


def render_heads(heads: list[dict[str, Any]], models: list[dict[str, Any]]) -> list[str]:
    head_rows = []
    for h in heads:
        if h["path"] != "unfused":
            continue
        fused = next(f for f in heads if f["path"] == "fused" and all(f[k] == h[k] for k in ("model", "precision", "head")))
        cells = [f"{r['bytes_per_token'] / 1024:.1f} KiB = {r['bytes_per_token'] / r['hidden']:.1f}d" for r in (h, fused)]
        head_rows.append([h["model"], h["vocab"], h["precision"], h["head"], *cells,
                          f"{h['weight_sized_bytes'] / 2**20:.0f} / {fused['weight_sized_bytes'] / 2**20:.0f}"])
    model_cells = [
        [m["model"], m["layers"], m["attention"], m["variant"], m["head"],
         f"{m['bytes_per_token'] / 1024:.1f} KiB = {m['bytes_per_token'] / m['hidden']:.1f}d", f"{m['ratio']:.0%}",
         f"{m['head_share']:.0%}"]
        for m in models
    ]
    return [
        *section("LM head + loss per token (true vocabularies)",
                 "Saved for backward by `lm_head` and transformers' causal-LM loss, per token: `unfused` as the model "
                 "computes it, `fused` through the fused linear + cross-entropy. Weight-sized storages (an autocast copy "
                 "of an fp32 weight; the fused path's fp32 weight gradient, computed in the forward and needed in "
                 "backward anyway) are per step, listed apart."),
        *table(["model", "vocab", "precision", "head", "unfused", "fused", "weight-sized, unfused / fused (MiB)"], head_rows),
        "",
        *section("Whole causal LM per token (bf16-mixed, frozen head)",
                 "The real model's layer count times the block above, plus the head and loss: the default conversion "
                 "with the head as the model computes it, and with the fused loss."),
        *table(["model", "layers", "attention", "blocks", "head + loss", "per token", "vs baseline", "head share"],
               model_cells),
        "",
    ]


def render(payload: Payload) -> str:
    rows, heads = payload["results"], payload["heads"]
    lines = [
        "# Activation memory per token per block",
        "",
        f"Machine: **{payload['machine']}** (the counts are device independent). Generated by "
        "`python benchmarks/activation_memory.py`.",
        "Bytes saved for backward while one block runs, once per storage, parameters excluded, divided by "
        "the tokens in the batch; autocast weight copies (bf16 copies of fp32 weights) listed apart, per block.",
        "",
        *section("Targets (bf16-mixed, the default conversion ('both') vs baseline)"),
        *table(["block", "attention", "ratio", "target", "met"],
               [[t["model"], t["attention"], f"{t['ratio']:.1%}", f"<= {t['limit']:.0%}", "yes" if t["met"] else "no"]
                for t in payload["targets"]]),
        "",
    ]
    for precision in PRECISIONS:
        for view in views_of(precision):
            selected = [r for r in rows if r["precision"] == precision and r["attention"] == view]
            if selected:
                lines += _variant_table(selected, f"{precision}, {VIEW_TITLES[view]}")
    bucket_rows = [
        [row["model"], row["attention"], row["variant"], *(f"{row['buckets_per_token'][b] / row['hidden']:.2f}" for b in BUCKETS)]
        for row in rows if row["precision"] == "bf16-mixed"
    ]
    lines += [
        *section("Where the bytes are (bf16-mixed, bytes per token / d)"),
        *table(["model", "attention", "variant", *BUCKETS], bucket_rows),
    ]
    lines += ["", *render_heads(heads, payload["models"])] if heads else []
    return document(lines)


VIEW_TITLES = {"cpu": "attention as run on this CPU", "gpu": "GPU attention path (flash / memory-efficient)"}


def _variant_table(selected: list[dict[str, Any]], title: str) -> list[str]:
    """One table: a row per model, a column per variant ('-' where a variant does not apply)."""
    cells = pivot(selected, ("model",), ("variant",), VARIANTS,
                  lambda r: f"{r['bytes_per_token'] / 1024:.1f} KiB = {r['bytes_per_token_over_d']:.1f}d ({r['ratio']:.0%})")
    table_rows = [[base["model"], base["hidden"], *row, f"{base['autocast_weight_copy_bytes'] / 2**20:.1f}"]
                  for base, row in cells]  # base: the baseline, measured first
    return [*section(title), *table(["model", "d", *VARIANTS, "autocast weight copies (MiB/block)"], table_rows), ""]


def readme_targets(payload: dict[str, Any] | None) -> list[TargetRow]:
    """The README rows of TARGETS: the default conversion's block memory over the baseline's."""
    if payload is None:
        return [TargetRow("Block activation memory vs baseline")]
    rows = []
    for goal in payload.get("targets", []):
        view = "GPU attention path" if goal["attention"] == "gpu" else "attention as run"
        rows.append(TargetRow(f"{goal['model']} block activation memory, bf16-mixed, default conversion, {view}: "
                              f"<= {goal['limit']:.0%} of baseline", f"{goal['ratio']:.1%}", payload["machine"], goal["met"]))
    return rows


README_VIEWS = {
    "gpu": "GPU attention path: attention counted as flash / memory-efficient attention saves it",
    "cpu": "attention as run on this CPU (with attention dropout: the math path, s x s probabilities saved)",
}


def readme_section(payload: dict[str, Any] | None, root: str) -> list[str]:
    """The README's table per attention view (bf16-mixed) and the chart; ``root`` leads to the repository root."""
    if payload is None:
        return []
    lines = [
        "### Activation memory per token per block (bf16-mixed)",
        "",
        "Bytes saved for backward by one block in the middle of the stack, once per storage, parameters and "
        "autocast weight copies excluded; in units of the hidden size d, and as a share of the baseline. "
        "`paper`: both techniques as published; `both`: the default conversion (plus fused gated MLPs, mask-free "
        "dropout, post-LN output sharing); `liger`: Liger-Kernel's RMSNorm and SwiGLU.",
        "",
    ]
    for view, title in README_VIEWS.items():
        rows = [r for r in payload["results"] if r["precision"] == "bf16-mixed" and r.get("attention", "cpu") == view]
        if not rows:
            continue
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        table_rows = [[base["model"], base["hidden"], *cells] for base, cells in pivot(
            rows, ("model",), ("variant",), variants, lambda r: f"{r['bytes_per_token_over_d']:.1f}d ({r['ratio']:.0%})")]
        lines += [f"{title}:", "", *table(["model", "d", *variants], table_rows), ""]
    return [*lines, f"![activation memory]({root}benchmarks/results/activation_memory_cpu.png)", ""]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars by bucket, bf16-mixed on the GPU attention path, one panel per model (like the
    paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["precision"] == "bf16-mixed" and r["attention"] == "gpu"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = min(4, len(models))
    lines = -(-len(models) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.0 * columns, 3.3 * lines + 0.8), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    colors = plt.get_cmap("tab10").colors
    for ax, model in zip(axes.flat, models):
        selected = {r["variant"]: r for r in rows if r["model"] == model}
        variants = [v for v in VARIANTS if v in selected]
        bottom = [0.0] * len(variants)
        for index, bucket in enumerate(BUCKETS):
            heights = [selected[v]["buckets_per_token"][bucket] / selected[v]["hidden"] for v in variants]
            ax.bar(variants, heights, bottom=bottom, color=colors[index], label=bucket)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(model, fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    for row in axes:
        row[0].set_ylabel("saved bytes per token / d", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=7)
    fig.suptitle("bf16-mixed, GPU attention path: bytes saved for backward per token per block", y=0.93, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / (3.3 * lines + 0.8)))
    fig.savefig(path, dpi=120)
    plt.close(fig)


PARTS_DIR = ".activation_memory_parts"


def measure_in_fresh_processes(names: list[str], precisions: tuple[str, ...], parts: Path | None) -> list[dict[str, Any]]:
    """Every model in its own fresh process: the 7B-shaped layers' copies leave the allocator
    holding memory that a long-lived process would accumulate (it reached 22 GB on a 24 GB machine).

    Each finished model is kept in ``parts`` (removed once all are done), so a run that dies
    (e.g. killed for memory) resumes at the first model it did not finish.
    """
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        part = parts / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json" if parts is not None else None
        if part is not None and part.exists():
            rows += json.loads(part.read_text())
            print(f"{name}: kept from an earlier run ({part})", flush=True)
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            measured = pool.submit(measure_model, name, False, precisions).result()
        if part is not None:
            part.write_text(json.dumps(measured))
        rows += measured
        print(f"{name}: done", flush=True)
    if parts is not None:
        shutil.rmtree(parts)
    return rows


def main() -> None:
    parser = arguments(__doc__, "toy widths, 3 models, bf16-mixed only")
    parser.add_argument("--heads-only", action="store_true",
                        help="count only the LM heads (seconds, on fake tensors); keep the block rows of the results in --out")
    args = parser.parse_args()
    out = out_folder(args.out, args.quick)

    if args.heads_only:
        if out is None:
            parser.error("--heads-only merges into an earlier run's results: pass --out DIR (not with --quick)")
        kept = json.loads((out / f"{RESULT}.json").read_text())
        rows, targets, machine, quick = kept["results"], kept["targets"], kept["machine"], kept["quick"]
    else:
        precisions = ("bf16-mixed",) if args.quick else PRECISIONS
        names = list(_configs(args.quick))
        rows = []
        if args.quick:
            for name in names:
                rows += measure_model(name, args.quick, precisions)
        else:
            rows = measure_in_fresh_processes(names, precisions, out / PARTS_DIR if out is not None else None)
        ratios(rows)
        targets = target_rows(rows)
        machine, quick = machine_name(torch.device("cpu")), args.quick
    heads = head_rows(rows)
    payload = {"machine": machine, "quick": quick, "targets": targets, "results": rows, "heads": heads,
               "models": model_rows(rows, heads)}
    publish(RESULT, payload, render, out)
    if out is not None and not args.heads_only:  # the chart shows the blocks only
        try:
            plot(rows, out / f"{RESULT}.png")
        except ModuleNotFoundError:
            print("matplotlib is not installed: no chart (pip install matplotlib)")


if __name__ == "__main__":
    main()
