"""The causal-LM loss through the fused linear + cross-entropy: no ``tokens x vocab`` logits.

For a transformers causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) whose head is a plain
``nn.Linear`` and whose loss is transformers' own ``ForCausalLMLoss``, :func:`apply_fused_loss`

- replaces the head by a :class:`~lightning_approxbp.nn.lm_head.FusedLMHead` that holds the same parameters (state-dict keys and
  parameter objects unchanged, tied embeddings stay tied), and
- adds a forward pre-hook and a forward hook to the model. In training mode, when ``labels`` is
  passed as a keyword (and neither ``shift_labels`` nor ``logits_to_keep``), the pre-hook takes
  the labels out of the call so that the model computes no loss, the head records its input and
  returns an empty placeholder instead of logits, and the hook computes transformers' loss with
  :func:`~lightning_approxbp.ops.linear_cross_entropy.linear_cross_entropy`: labels shifted by
  one, ``-100`` ignored, the mean over the other tokens, or the sum divided by
  ``num_items_in_batch`` when it is passed; Gemma's ``final_logit_softcapping`` included. The
  output then has ``logits=None``. Evaluation mode and calls without labels are unchanged.

When it is on (``ConversionConfig.fused_loss``): ``True`` always (logits are then ``None``
in training, even for a step that reads them); ``"auto"`` only when the probe runs the model in
training with ``labels`` and the probe computes nothing with the returned logits (every torch
operation on them after the model returns is watched); ``False`` never. Each candidate is checked
on a small random batch: the fused loss must equal the original's, else it is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_approxbp.conversion.probe import (
    ProbeFn,
    default_tolerance,
    isolated,
    run_probe,
)
from lightning_approxbp.conversion.report import ConversionReport
from lightning_approxbp.conversion.structure import has_no_values
from lightning_approxbp.nn.lm_head import FusedLMHead
from lightning_approxbp.nn.shared_input import AffineMergedLinear, SharedInputLinear
from lightning_approxbp.ops.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class FusedLossConfig:
    """The fused loss's option (the same name as in
    :class:`~lightning_approxbp.conversion.config.ConversionConfig`, which documents it)."""

    fused_loss: bool | str = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.fused_loss, bool) or self.fused_loss == "auto"):
            raise ValueError(f"fused_loss={self.fused_loss!r} is unknown; use True, False or 'auto'.")


# Heads computed exactly as nn.Linear (the merged one applies its norm's affine first).
_HEAD_TYPES = (nn.Linear, SharedInputLinear, AffineMergedLinear)
_CHECK_SHAPE = (2, 9)


def _head_holder(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """``(parent, attribute, head)`` of the model's output embedding, if it is a direct child."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    for name, child in model._modules.items():
        if child is head:
            return model, name, head
    return None


def is_causal_lm(module: nn.Module) -> bool:
    """A transformers causal LM that holds its head (a PEFT wrapper delegates to the model inside)."""
    name = type(module).__name__
    causal = name.endswith(("ForCausalLM", "LMHeadModel"))
    return causal and hasattr(module, "config") and _head_holder(module) is not None


def why_not_fusable(model: nn.Module) -> str | None:
    """Why the loss of this causal LM cannot be fused exactly, or ``None`` if it can."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    head = model.get_output_embeddings()
    if type(head) not in _HEAD_TYPES:
        return f"the head is a {type(head).__name__}, not a plain nn.Linear (e.g. LoRA on lm_head)"
    if getattr(model, "loss_function", None) is not LOSS_MAPPING["ForCausalLM"]:
        return "its loss_function is not transformers' ForCausalLMLoss"
    if not getattr(model.config, "return_dict", True):
        return "config.return_dict=False: a tuple output has no place to say logits=None"
    return None


def _plain_loss_call(kwargs: dict[str, Any]) -> bool:
    """A call whose loss is transformers' default: labels by keyword, all positions, a ModelOutput."""
    keep = kwargs.get("logits_to_keep", 0)
    return (
        kwargs.get("labels") is not None
        and "shift_labels" not in kwargs
        and isinstance(keep, int) and keep == 0
        and kwargs.get("return_dict") is not False
    )


class FusedLoss:
    """The hooks and head swap of one model; :meth:`remove` undoes them."""

    def __init__(self, model: nn.Module) -> None:
        parent, self.name, self.original = _head_holder(model)  # type: ignore[misc]
        self.model, self.parent = model, parent
        self.head = FusedLMHead.from_module(self.original)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.pending: dict[str, Any] | None = None
        self.enabled = True
        setattr(parent, self.name, self.head)
        self.handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        model._approxbp_fused_loss = self  # type: ignore[assignment]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        setattr(self.parent, self.name, self.original)
        del self.model._approxbp_fused_loss

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        # Reset first: a forward that raised never reached the hook that disarms the head.
        self.pending, self.head.capturing, self.head.captured = None, False, None
        if not (self.enabled and model.training and _plain_loss_call(kwargs)):
            return None
        self.pending = {"labels": kwargs["labels"], "num_items_in_batch": kwargs.get("num_items_in_batch")}
        self.head.capturing = True
        return args, {key: value for key, value in kwargs.items() if key != "labels"}

    def _after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self.pending is None:
            return None
        pending, hidden = self.pending, self.head.captured
        self.pending, self.head.capturing, self.head.captured = None, False, None
        if hidden is None:
            raise RuntimeError(f"fused loss: {type(model).__name__} did not call its head {self.name!r}.")
        loss = causal_lm_loss(hidden, self.head.weight, self.head.bias, pending["labels"],
                              pending["num_items_in_batch"], self.softcap)
        return dataclasses.replace(output, loss=loss, logits=None)


def causal_lm_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, num_items_in_batch: Any = None,
    softcap: float | None = None,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on the head's input, through the fused op.

    Position ``t`` predicts label ``t + 1``; the last position has no target.
    """
    labels = labels.to(hidden.device)
    target = nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, weight, target, bias, ignore_index=IGNORE_INDEX, reduction=reduction,
                                logit_softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ----------------------------------------------------------------------------- watching the probe


@dataclasses.dataclass
class _Seen:
    """What the probe runs did with one causal LM."""

    labels_in_training: bool = False
    logits_used: bool = False
    logits: list[Tensor] = dataclasses.field(default_factory=list)


class _LogitsUse(TorchFunctionMode):
    """Marks every watched model whose returned logits enter a torch operation."""

    def __init__(self, seen: dict[nn.Module, _Seen]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        watched = [s for s in self.seen.values() if s.logits and not s.logits_used]
        if watched:
            leaves = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
            for seen in watched:
                seen.logits_used = any(leaf is logits for leaf in leaves for logits in seen.logits)
        return func(*args, **kwargs)


class LogitsWatch:
    """Watches what probe runs do with the labels and logits of every causal LM under ``root``.

    :meth:`wrap` returns the probe with the watch around it, so the conversion's own probe runs
    serve (no extra run); the hooks exist only while the probe runs, and the watch ends before
    the caller reads the outputs itself.
    """

    def __init__(self, root: nn.Module) -> None:
        self.seen = {m: _Seen() for m in root.modules() if is_causal_lm(m)}
        self.runs = 0

    def wrap(self, probe: ProbeFn) -> ProbeFn:
        def watched(module: nn.Module) -> Any:
            handles = []
            for model, seen in self.seen.items():
                handles.append(model.register_forward_pre_hook(_record_labels(seen), with_kwargs=True))
                handles.append(model.register_forward_hook(_record_logits(seen)))
            try:
                with _LogitsUse(self.seen):
                    return probe(module)
            finally:
                for handle in handles:
                    handle.remove()
                for seen in self.seen.values():
                    seen.logits.clear()
                self.runs += 1

        return watched


def _record_labels(seen: _Seen) -> Callable:
    def hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.labels_in_training |= model.training and kwargs.get("labels") is not None

    return hook


def _record_logits(seen: _Seen) -> Callable:
    def hook(model: nn.Module, args: tuple, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            seen.logits.append(logits)

    return hook


# ----------------------------------------------------------------------------- the rule


def _loss_difference(model: nn.Module, fused: FusedLoss) -> float:
    """Relative difference of the fused and the original loss on a random batch (train mode, no grad)."""
    device = fused.head.weight.device
    generator = torch.Generator().manual_seed(0)  # not the global RNG: conversion leaves it untouched
    ids = torch.randint(0, fused.head.out_features, _CHECK_SHAPE, generator=generator)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.25, IGNORE_INDEX)
    ids, labels = ids.to(device), labels.to(device)
    losses = []
    for enabled in (False, True):
        fused.enabled = enabled
        with isolated(model), torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.double())
    reference, ours = losses
    return ((ours - reference).abs() / reference.abs().clamp(min=1e-12)).item()


def _decide(seen: _Seen | None, setting: bool | str) -> tuple[bool, str]:
    if setting is True:
        return True, "forced (fused_loss=True)"
    if seen is None:
        return False, ("no training-step probe (an example_input cannot show whether training reads "
                       "outputs.logits); pass fused_loss=True to force")
    if not seen.labels_in_training:
        return False, "the probe passes no labels to it in training (the loss is computed outside the model)"
    if seen.logits_used:
        return False, ("the probe computes with outputs.logits (e.g. a metric), which would be None; "
                       "pass fused_loss=True to force")
    return True, "the probe uses the loss and not the logits"


def apply_fused_loss(
    root: nn.Module, probe: ProbeFn | None, setting: bool | str, report: ConversionReport,
    watch: LogitsWatch | None = None,
) -> None:
    """Fuse the head and loss of every causal LM under ``root`` where ``setting`` allows; report each.

    ``probe`` runs a training step (``None``: there is none); ``watch`` is what earlier runs of
    it (wrapped by :meth:`LogitsWatch.wrap`) saw; without one, ``"auto"`` runs the probe once.
    """
    if setting == "auto" and probe is not None:
        if watch is None:
            watch = LogitsWatch(root)
            probe = watch.wrap(probe)
        if not watch.runs:  # the conversion had nothing else to probe for
            run_probe(root, probe)
    fused_any = False
    for fqn, model in list(root.named_modules()):
        if not is_causal_lm(model):
            continue
        # The head's name, with the model's class as kind (the head may have a merge row of its own).
        head_name = _head_holder(model)[1]  # type: ignore[index]
        kind, label = type(model).__name__, f"{fqn}.{head_name}" if fqn else head_name
        if getattr(model, "_approxbp_fused_loss", None) is not None:
            report.add(label, kind, "unchanged", reason="already converted")
            continue
        why_not = why_not_fusable(model)
        if why_not is not None:
            report.add(label, kind, "skipped", reason=f"loss not fused: {why_not}")
            continue
        enabled, why = _decide(None if watch is None else watch.seen.get(model), setting)
        if not enabled:
            if watch is None and setting == "auto":
                report.notes.append(f"{label}: loss not fused: {why}.")  # nothing was examined: a note
            else:
                report.add(label, kind, "skipped", reason=f"loss not fused: {why}")
            continue
        if has_no_values(model):
            report.add(label, kind, "skipped", reason=(
                "loss not fused: the model has no values here (meta device, or the meta copy of a sharded "
                "model), so the fused loss cannot be checked against the model's own; convert it with real "
                "weights before sharding to fuse it"))
            continue
        fused = FusedLoss(model)
        try:
            difference = _loss_difference(model, fused)
        except Exception as error:  # noqa: BLE001 - any failure leaves the model as it was, reported
            fused.remove()
            report.add(label, kind, "skipped", reason=f"loss not fused: the check batch failed ({error})")
            continue
        tolerance = default_tolerance(fused.head.weight.dtype)
        if not difference <= tolerance:
            fused.remove()
            report.add(label, kind, "skipped",
                       reason=f"loss not fused: differs from the original by {difference:.1e} (> {tolerance:.0e})")
            continue
        fused_any = True
        softcap = f", softcap {fused.softcap:g}" if fused.softcap else ""
        report.add(label, kind, "converted", f"fused linear + cross-entropy{softcap}",
                   f"{why}; in training with labels the loss never builds tokens x vocab logits and "
                   f"outputs.logits is None (loss matches within {difference:.0e})")
    if fused_any and report.bytes_after is not None:
        report.notes.append(
            "saved bytes were counted before the causal-LM loss was fused, which further removes the "
            "tokens x vocab logits (and their fp32 copy) from what the step saves."
        )
