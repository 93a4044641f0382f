"""``convert``: turn a model into a lower-memory one in place, exactly, and report what changed.

The engine knows no technique: it runs :data:`RULES`, an ordered tuple of
:class:`~lightning_approxbp.conversion.rule.Rule` objects (one per technique, each in its own
file), through the same steps: collect (each module, the first rule that deals with it), trace
(one reference probe run watching what the rules ask for), decide, swap, verify (per block kind,
and the whole output where that is cheap and meaningful), report. The fused loss runs last, on
its own, because it changes the model's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_approxbp._warnings import warn_rank_zero
from lightning_approxbp.conversion.activations import ActivationRule
from lightning_approxbp.conversion.blocks import (
    BlockKind,
    block_kinds,
    block_outputs,
    capture_inputs,
)
from lightning_approxbp.conversion.config import ConversionConfig, VerifyConfig
from lightning_approxbp.conversion.dropout import DropoutRule
from lightning_approxbp.conversion.fused_loss import (
    FusedLossConfig,
    LogitsWatch,
    apply_fused_loss,
)
from lightning_approxbp.conversion.gated_experts import GatedExpertsRule
from lightning_approxbp.conversion.gated_mlp import GatedMLPRule
from lightning_approxbp.conversion.norms import NormRule
from lightning_approxbp.conversion.probe import (
    ProbeFn,
    ProbeRun,
    default_tolerance,
    max_relative_error,
    probe_from_example,
    run_probe,
)
from lightning_approxbp.conversion.report import ConversionReport
from lightning_approxbp.conversion.rule import ConversionState, Rule
from lightning_approxbp.conversion.sharded import (
    convert_sharded,
    describe,
    sharded_modules,
    why_not_convertible,
)
from lightning_approxbp.conversion.structure import has_no_values, materialized_twin
from lightning_approxbp.conversion.walker import ModuleFilter, sites
from lightning_approxbp.errors import ProbeError

T = TypeVar("T")

# Collected in this order (each module goes to the first rule that deals with it) and swapped in
# the reverse order: a rule that holds other modules comes first so that it claims what it
# computes itself, and is swapped last so that it takes over children that later rules replaced.
RULES: tuple[Rule, ...] = (
    GatedMLPRule(),  # before the activation rule: it claims the activation it computes exactly
    GatedExpertsRule(),  # the same for mixture-of-experts experts
    DropoutRule(),  # before the activation rule: a parameter-free leaf it could probe in vain
    NormRule(),  # swapped before the gated MLPs: a merged gate/up projection is then the child they hold
    ActivationRule(),  # last: whatever no other rule took that computes an activation
)

# Up to this many blocks of one kind, the whole model's output is compared too.
_WHOLE_MODEL_MAX_REPEATS = 4
# Up to this many parameter elements, a model with values probes on real tensors even where no
# value is compared: its forward costs less than fake tensors' per-op dispatch (~1 ms an op on
# CPU). Measured on the main job's MiniLM-L6 (22.7M), 1 CPU thread: 0.67 s fake, 0.15 s real.
# Above it (billions of parameters), fake tensors spare the arithmetic and the activations.
_REAL_PROBE_MAX_PARAMETERS = 200_000_000
_NO_PROBE_NOTE = (
    "no probe batch: the uses of norm outputs were not traced, so no affine was merged (norms with safe "
    "weights keep their affine), the output was not verified and saved bytes were not measured. Pass "
    "example_input (or set example_input_array) for the full conversion."
)

_SHARDED_NOTE = (
    "converted after fully_shard: decided on a meta-device copy of the model (nothing gathered), then the "
    "replacements were given the sharded parameters and FSDP2 was pointed at them."
)


class _Conversion(ConversionState):
    """One call of :func:`convert`: the rules' steps in order, and the verification."""

    # ----------------------------------------------------------------------- collect
    def collect(self) -> None:
        for site in self.sites:
            module = site.module
            if self.is_left_alone(module):
                continue
            if self.is_converted(module):
                self.report.add(site.fqn, type(module).__name__, "unchanged", reason="already converted")
                for rule in self.rules:
                    if isinstance(module, rule.converted):
                        for inside in rule.left_alone_inside(module):
                            self.leave_alone(inside)
                continue
            if self.is_filtered_out(site):
                continue
            for rule in self.rules:
                if rule.find(site, self):
                    break

    # ----------------------------------------------------------------------- trace
    def wants_trace(self) -> bool:
        return self.any_candidates() or any(rule.watches_calls(self) for rule in self.rules)

    def traced_norms(self) -> dict[nn.Module, int | None]:
        """The norms whose output uses the rules need traced (module -> features)."""
        return {module: n for rule in self.rules for module, n in rule.traced_norms(self.candidates[rule]).items()}

    def trace(self, probe: ProbeFn, compute_free: bool = False) -> ProbeRun:
        """The reference probe run: what the rules ask to be watched (where each norm's output
        goes, which activations are called as functions)."""
        norms = self.traced_norms() or None
        watch = any(rule.watches_calls(self) for rule in self.rules)
        return run_probe(self.root, probe, trace_norms=norms, compute_free=compute_free, watch_activations=watch)

    def traced(self, run: ProbeRun) -> None:
        self.reference = run
        for rule in self.rules:
            rule.traced(run, self)

    # ----------------------------------------------------------------------- decide + swap
    def apply(self) -> None:
        plans = {rule: [rule.decide(candidate, self) for candidate in self.candidates[rule]] for rule in self.rules}
        for rule in reversed(self.rules):
            for plan in plans[rule]:
                rule.apply(plan, self)
        order = {site.fqn: index for index, site in enumerate(self.sites)}
        self.report.rows.sort(key=lambda row: order.get(row.fqn, order.get(row.fqn.rpartition(".")[0], len(order))))

    # ----------------------------------------------------------------------- verify
    def prepare_block_checks(self, kinds: list[BlockKind]) -> list[_BlockCheck]:
        """Before the swap: each block kind's inputs and its representative's reference output.

        A representative without values is checked on a materialised twin (random weights).
        """
        checks = []
        for kind in kinds:
            if kind.inputs is None:
                continue  # not called by the probe: nothing it computes was traced either
            representative = kind.representative.module
            twin = materialized_twin(representative) if has_no_values(representative) else None
            device = next((twin or representative).parameters(), torch.empty(0)).device
            inputs = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, kind.draw_inputs())
            checks.append(_BlockCheck(kind, inputs, twin, block_outputs(twin or representative, inputs)))
        return checks

    def verify_blocks(self, checks: list[_BlockCheck]) -> None:
        """After the swap: every block kind's representative computes what it computed before
        (a twin is converted on its own first, with this conversion's options)."""
        for check in checks:
            fqn = check.kind.representative.fqn
            where = f"the output of {fqn} and the {len(check.kind.members) - 1} other blocks of its kind"
            if check.twin is not None:
                args, kwargs = check.inputs
                convert(check.twin, probe=lambda m: m(*args, **kwargs), config=replace(self.config, verify=False))
                block = check.twin
                where += f" (checked on a copy of {fqn} with random weights)"
            else:
                current = check.kind.representative.holders[0]
                block = getattr(*current) if current else self.root
            error, index = max_relative_error(check.reference, block_outputs(block, check.inputs))
            self.report.max_error = max(self.report.max_error or 0.0, error)
            tolerance = self._tolerance(check.reference, block)
            if error > tolerance:
                self._refuse(error, index, tolerance, where=where)

    def _tolerance(self, outputs: list[Tensor], module: nn.Module) -> float:
        dtypes = [t.dtype for t in outputs] + [p.dtype for p in module.parameters()]
        return self.part(VerifyConfig).tolerance or max((default_tolerance(d) for d in dtypes), default=1e-4)

    def _refuse(self, error: float, index: int, tolerance: float, where: str) -> None:
        changed = ", ".join(row.fqn for row in self.report.converted[:8])
        more = len(self.report.converted) - 8
        self.log.undo_all()
        raise RuntimeError(
            f"ApproxBP conversion changed {where}: max relative difference {error:.3e} at output {index} "
            f"exceeds the tolerance {tolerance:.1e}. The model was left unconverted. Converted modules were: "
            f"{changed}{f' and {more} more' if more > 0 else ''}. Exclude the culprit with filter=..., or pass "
            "verify=False to accept the difference."
        )

    def verify(self, reference: ProbeRun, converted: ProbeRun) -> None:
        """The whole model's output on the probe batch is what it was."""
        error, index = max_relative_error(reference.outputs, converted.outputs)
        tolerance = self._tolerance(reference.outputs, self.root)
        self.report.max_error = max(self.report.max_error or 0.0, error)
        if error > tolerance:
            self._refuse(error, index, tolerance, where="the model output")


@dataclass
class _BlockCheck:
    kind: BlockKind
    inputs: tuple[tuple[Any, ...], dict[str, Any]]
    twin: nn.Module | None  # a materialised copy, for a representative without values
    reference: list[Tensor]  # what the representative (or its twin) computed before conversion


def _to_meta(leaf: Any) -> Any:
    return leaf.to("meta") if isinstance(leaf, Tensor) else leaf


class _ProbeRunner:
    """Runs the probe on fake tensors while that works, else on real ones: a forward that needs
    values fails on fake tensors once, and every later run goes straight to real tensors (on the
    meta device, real means meta tensors, which suits some models better)."""

    def __init__(self, compute_free: bool) -> None:
        self.compute_free = compute_free

    def __call__(self, run: Callable[[bool], T]) -> T:
        if self.compute_free:
            try:
                return run(True)
            except Exception:  # noqa: BLE001 - e.g. a data-dependent branch or `.item()` in the model's forward
                self.compute_free = False
        return run(False)


def _whole_model_note(has_values: bool, kinds: list[BlockKind]) -> str:
    why = (
        "its parameters are on the meta device (no values)"
        if not has_values
        else f"its error would grow with depth ({max(len(kind.members) for kind in kinds)} repeated blocks)"
    )
    return f"whole-model output not compared: {why}; each block kind was verified on its first member instead."


def convert(
    module: nn.Module,
    example_input: Any = None,
    *,
    config: ConversionConfig | None = None,
    filter: ModuleFilter | None = None,
    probe: ProbeFn | None = None,
    probe_label: str | None = None,
    **options: Any,
) -> ConversionReport:
    """Convert activations and norms of ``module`` in place; return what was done.

    GELU/SiLU-family activations become step-derivative ones (exact forward, ``bits`` per
    element saved). LayerNorm/RMSNorm modules become memory-sharing ones (they save their output,
    which the next layer saves anyway); their affine is merged into the consuming linear layers
    when every use of the norm output is one (exact forward and gradients, state dict unchanged),
    else kept with output-based recovery when ``|weight|`` is safe, else the norm is skipped.
    Calling ``convert`` again changes nothing.

    Args:
        module: the model; converted in place (the root module itself is never replaced).
        example_input: one batch as ``forward`` takes it: a tensor, a tuple of positional
            arguments or a dict of keyword arguments. Needed to merge affines, verify the
            output and measure saved bytes.
        config: what to convert and how (a
            :class:`~lightning_approxbp.conversion.config.ConversionConfig`); default: the
            defaults of its fields, overridden by ``options``.
        options: the fields of ``ConversionConfig`` as keywords (``activations``, ``norms``,
            ``gated_mlp``, ``dropout``, ``share_norm_output``, ``bits``, ``table``, ``affine``,
            ``fused_loss``, ``verify``, ``min_keep_weight``, ``tolerance``), instead of ``config``.
        filter: ``(module, fqn) -> bool``; only norms and activations for which it returns
            ``True`` are considered.
        probe: instead of ``example_input``, a function that runs the model once the way
            training does (e.g. ``lambda m: m.training_step(batch, 0)``).
        probe_label: how the probe is described in the report.

    Returns:
        The :class:`~lightning_approxbp.conversion.report.ConversionReport`.

    Raises:
        ValueError: for conflicting or unknown options, or a model sharded by FSDP1 or tensor
            parallelism (convert first, then shard). A model sharded with FSDP2's ``fully_shard``
            is converted: decided on a meta-device copy, its replacements hold the sharded
            parameters (see :mod:`~lightning_approxbp.conversion.sharded`).
        ProbeError: (a ``ValueError``) when the model rejects ``example_input`` (or ``probe``
            fails); the model's own error is chained and the model is unchanged.
        RuntimeError: if ``verify`` finds a different output (the model is then left unconverted).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        >>> report = convert(model, torch.randn(4, 16))
        >>> [row.action for row in report.rows]
        ['converted', 'converted', 'converted']
        >>> report.bytes_after < report.bytes_before
        True
    """
    started = time.perf_counter()
    config = ConversionConfig.build(config, **options)
    if example_input is not None and probe is not None:
        raise ValueError("Pass either example_input or probe, not both.")
    sharded = sharded_modules(module)
    if sharded:
        why = why_not_convertible(module)
        if why is not None:
            raise ValueError(
                f"convert() must run before sharding here: {describe(sharded)} are sharded and {why}, which keeps "
                "per-module state that replaced modules would break. Call convert(model, example_input) first, "
                "then shard (fully_shard / FSDP / parallelize_module)."
            )

        def convert_skeleton(skeleton: nn.Module) -> ConversionReport:
            return convert(skeleton, example_input, config=config, filter=filter, probe=probe, probe_label=probe_label)

        report = convert_sharded(module, convert_skeleton)
        report.notes.append(_SHARDED_NOTE)
        report.seconds = time.perf_counter() - started
        return report
    has_values = not has_no_values(module)
    if probe is None and example_input is not None:
        # A model without values runs on meta inputs (shapes only), whatever device the batch is on.
        inputs = example_input if has_values else tree_map(_to_meta, example_input)
        probe = probe_from_example(inputs)
        probe_label = probe_label or "example_input"
    # The fused loss ("auto") watches the probe runs for reads of the logits; only a training step shows them.
    fused_loss, verify = config.part(FusedLossConfig).fused_loss, config.part(VerifyConfig).verify
    watch = LogitsWatch(module) if fused_loss == "auto" and probe is not None and example_input is None else None
    probe = watch.wrap(probe) if watch is not None else probe
    conversion = _Conversion(module, config, filter, RULES, list(sites(module)))
    report = conversion.report
    report.probe = probe_label or ("custom" if probe is not None else "none")
    conversion.collect()
    kinds = block_kinds(conversion.sites, conversion.structure)
    # The whole output is compared where that is cheap and meaningful: a model with values and
    # few repeated blocks (its error grows with depth, and each block kind is checked anyway).
    # Unverified (e.g. the twin of a block kind, converted only to be compared), nothing needs values.
    whole_model_check = verify and has_values and all(len(kind.members) <= _WHOLE_MODEL_MAX_REPEATS for kind in kinds)
    # Without a whole-model comparison, the probe only traces and counts: fake tensors do that
    # without the arithmetic, and transformers skips its data-dependent checks on them (a model
    # whose forward needs values runs as it is instead). A small model with values runs faster as it is.
    small = has_values and sum(p.numel() for p in module.parameters()) <= _REAL_PROBE_MAX_PARAMETERS
    runner = _ProbeRunner(compute_free=not (whole_model_check or small))

    def reference_run(compute_free: bool) -> ProbeRun | None:
        with capture_inputs(kinds):
            if probe is not None and conversion.wants_trace():
                return conversion.trace(probe, compute_free)
        return None

    try:
        reference = runner(reference_run)
    except Exception as error:
        raise ProbeError(report.probe, error) from error
    if reference is not None and not any(t.numel() for t in reference.outputs):
        raise ValueError(
            f"ApproxBP: the probe ({report.probe}) produced no output elements (an empty batch?), so nothing "
            "could be traced or verified. Pass a batch with at least one sample; the model was not changed."
        )
    if reference is not None:
        conversion.traced(reference)
    checked = reference is not None and verify and conversion.any_candidates()
    block_checks = conversion.prepare_block_checks(kinds) if checked else []
    conversion.apply()
    if probe is None:
        if conversion.traced_norms():
            report.notes.append(_NO_PROBE_NOTE)
    elif reference is not None and not report.converted:
        # Nothing changed: the reference run measured the model as it stays, so it is not run again.
        report.bytes_before = report.bytes_after = reference.saved_bytes
    elif reference is not None:
        # The second run measures the converted model's saved bytes (on fake tensors where no
        # value is compared) and gives the whole-model output that verification compares.
        try:
            converted = runner(lambda free: run_probe(module, probe, compute_free=free))
        except Exception as error:
            conversion.log.undo_all()
            raise RuntimeError(
                "ApproxBP: the converted model failed on the probe batch; the model was left unconverted."
            ) from error
        report.bytes_before, report.bytes_after = reference.saved_bytes, converted.saved_bytes
        if verify:
            conversion.verify_blocks(block_checks)
            if whole_model_check:
                conversion.verify(reference, converted)
            else:
                report.notes.append(_whole_model_note(has_values, kinds))
    if fused_loss:
        # Last, after verification: it changes the model's outputs (logits=None), so it checks its
        # loss on its own. Only a training-step probe can show whether the logits are read.
        apply_fused_loss(module, probe if example_input is None else None, fused_loss, report, watch)
    if not report.rows or not (report.converted or any(r.action == "unchanged" for r in report.rows)):
        warn_rank_zero(
            f"ApproxBP: nothing to convert in {type(module).__name__} (no GELU/SiLU-family activation or "
            "LayerNorm/RMSNorm that can be converted exactly); the model is unchanged."
        )
    report.seconds = time.perf_counter() - started
    return report
