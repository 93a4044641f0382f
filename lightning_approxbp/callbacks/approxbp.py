r"""
ApproxBP
========

Converts a LightningModule to approximate and memory-sharing backpropagation before training.

"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from typing_extensions import override

from lightning_approxbp.conversion import ConversionConfig, ConversionReport, convert
from lightning_approxbp.conversion.probe import ProbeFn, probe_from_example
from lightning_approxbp.conversion.sharded import (
    describe,
    sharded_modules,
    why_not_convertible,
)
from lightning_approxbp.conversion.structure import has_no_values
from lightning_approxbp.conversion.walker import ModuleFilter
from lightning_approxbp.errors import ProbeError
from lightning_approxbp.memory import (
    CheckpointPlan,
    OffloadCost,
    apply_plan,
    parse_budget,
    plan_checkpointing,
    read_budget,
)
from lightning_approxbp.memory.sharded import (
    plan_sharded_checkpointing,
    shard_group_size,
)
from lightning_approxbp.memory.steps import configured_optimizer, training_step_loss
from lightning_approxbp.tables import StepTable

# Lightning calls these LightningModule hooks, in this order, after the callbacks' ``setup`` and
# before the device move, wrapping and ``configure_optimizers``; both may build layers.
_MODEL_HOOKS = ("setup", "configure_model")
_PENDING = "_approxbp_pending"  # marks our temporary hook wrapper on a module instance
_TRAIN_BATCH = "training_step on the first train batch"


class ProbeUnavailable(Exception):
    """The training step could not run on the probe batch at setup time."""


class ApproxBP(Callback):
    r"""Lower the activation memory of fine-tuning without changing what the model computes.

    When fitting, the LightningModule is converted in place by
    :func:`~lightning_approxbp.conversion.convert` right after its own ``setup`` and
    ``configure_model`` hooks (so layers built there are included) and before the device move,
    DDP/FSDP wrapping and ``configure_optimizers``. Under ``ModelParallelStrategy`` layers built
    in ``__init__``/``setup`` are converted before ``configure_model`` runs, and layers that
    ``configure_model`` builds (real, ``init_module(empty_init=True)`` or on the meta device) and
    shards with FSDP2's ``fully_shard`` are converted after it: decided on a meta-device copy,
    one plan per block kind, with no full-model forward and nothing gathered (see
    :mod:`~lightning_approxbp.conversion.sharded`); Lightning's materialisation and checkpoint
    loading then work as without the callback. A model the user converted by hand in
    ``configure_model`` is left alone and the report says so:

    - GELU/SiLU-family activations keep their exact forward and save ``bits`` per element for
      a step-function derivative (the only approximation: gradients through activations);
    - LayerNorm/RMSNorm modules save their output (shared with the next layer) instead of their
      input; their affine is merged into the consuming linear layers at compute time (exact,
      parameters unchanged) or kept with output-based recovery.

    The probe batch that traces the model is, in order: ``example_input`` given here,
    ``pl_module.example_input_array`` (passed to ``forward``), or the first batch of
    ``trainer.datamodule.train_dataloader()`` / ``pl_module.train_dataloader()`` (passed to
    ``training_step`` with logging disabled), drawn under :func:`isolate_rng`. Of a train batch
    only the first ``probe_samples`` samples are used (every tensor sliced along dim 0), which
    bounds the probe's time and memory; a batch whose tensors differ in leading size, or that
    cannot be sliced, is used whole, as is the whole batch when the step fails on the slice (the
    report's probe label says which). Dataloaders passed straight to ``Trainer.fit`` are not
    reachable at setup; without any probe batch only activations and safe affine-kept norms are
    converted (the report says so).

    The state dict keys and values do not change: checkpoints saved
    with this callback load strictly into the unconverted module, and resuming works.

    The report is printed once on rank zero and kept as :attr:`report`.

    Every conversion keyword left at ``None`` takes the default of
    :class:`~lightning_approxbp.conversion.ConversionConfig` (shown in brackets).

    Args:
        activations: convert activations (``True``).
        norms: convert norms (``True``).
        gated_mlp: fuse gated MLPs' down projections (saves gate and up outputs only; exact) (``True``).
        dropout: make ``nn.Dropout`` modules redraw their mask in backward instead of saving it (``True``).
        share_norm_output: post-LN blocks: linears reading a norm's output save that tensor (which
            the norm saves anyway) rather than their own autocast copy; bit-identical (``True``).
        bits: bits per activation element: 1, 2 or 4 (``2``).
        table: ``"fitted"``, ``"paper"`` or a :class:`~lightning_approxbp.tables.StepTable` (``"fitted"``).
        affine: ``"auto"``, ``"merge"`` or ``"keep"``; see
            :class:`~lightning_approxbp.conversion.ConversionConfig` (``"auto"``).
        fused_loss: compute a causal LM's training loss with the fused linear + cross-entropy:
            ``"auto"``, ``True`` or ``False`` (``"auto"``).
        verify: check the converted output on the probe batch; raise if it differs (``True``).
        filter: ``(module, fqn) -> bool`` choosing which norms/activations are considered.
        example_input: a forward input used as the probe batch.
        min_keep_weight: smallest ``|weight|`` for which a norm keeps its affine (``1e-2``).
        tolerance: relative output error accepted by ``verify`` (per dtype).
        config: all of the conversion options above as one
            :class:`~lightning_approxbp.conversion.ConversionConfig`, instead of the keywords
            (giving both is an error that names the keywords); e.g. a named one,
            ``ConversionConfig.preset("paper")``.
        probe_samples: how many samples of the first train batch the ``training_step`` probe
            runs on (``example_input`` and ``example_input_array`` are used as given).
        memory_budget: after conversion, checkpoint the fewest blocks (children of the model's
            largest ``nn.ModuleList``) for the simulated step peak to fit: bytes, a string such as
            ``"20GiB"``, or a fraction in ``(0, 1]`` of the training device's memory; see
            :func:`~lightning_approxbp.memory.plan_checkpointing`. The step is simulated on fake
            tensors on the device the model is on at setup (before the move to the accelerator)
            with the optimizer of ``configure_optimizers`` (AdamW if it cannot run there) on the
            whole batch the probe came from. The plan is kept as :attr:`memory_plan` and printed.
            A model sharded with ``fully_shard`` (built in ``configure_model``) is simulated per rank:
            FSDP2 itself runs on a fake process group of the shard group's size (the rank's shards,
            gradients and optimizer state, the all-gather and reduce-scatter buffers, activations of
            the rank's batch; see :mod:`~lightning_approxbp.memory.sharded`); every rank simulates,
            rank 0's plan is broadcast and applied on all ranks (checkpointing only: ``offload`` is
            an error there).
        offload: with ``memory_budget``, let the plan keep a block's saved tensors in (pinned) host
            memory instead of recomputing it, where the transfer is modelled to take less time than
            the recompute: ``True`` (the default rates of
            :class:`~lightning_approxbp.memory.OffloadCost`) or an ``OffloadCost``. Not considered
            when training runs on the CPU (``False``).

    Raises:
        ValueError: at construction, for unknown or conflicting options or an unreadable
            ``memory_budget`` (or ``offload`` without it); at setup, for a budget that cannot be
            met (the message gives the smallest reachable peak).
        RuntimeError: at conversion if verification finds a different output, or when modules are
            sharded by FSDP1 or tensor parallelism (the message says how to convert first).

    Example::

        from lightning.pytorch import Trainer
        from lightning_approxbp import ApproxBP

        approxbp = ApproxBP(bits=2)
        trainer = Trainer(callbacks=[approxbp], precision="bf16-mixed")
        trainer.fit(model, datamodule=datamodule)
        print(approxbp.report.reduction)
    """

    def __init__(
        self,
        activations: bool | None = None,
        norms: bool | None = None,
        gated_mlp: bool | None = None,
        dropout: bool | None = None,
        share_norm_output: bool | None = None,
        bits: int | None = None,
        table: StepTable | str | None = None,
        affine: str | None = None,
        fused_loss: bool | str | None = None,
        verify: bool | None = None,
        filter: ModuleFilter | None = None,
        example_input: Any = None,
        min_keep_weight: float | None = None,
        tolerance: float | None = None,
        config: ConversionConfig | None = None,
        probe_samples: int = 2,
        memory_budget: float | str | None = None,
        offload: bool | OffloadCost = False,
    ) -> None:
        if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 1:
            raise ValueError(
                "`probe_samples` must be a positive int (how many samples of the first train batch to probe), "
                f"got {probe_samples!r}."
            )
        options = {
            "activations": activations,
            "norms": norms,
            "gated_mlp": gated_mlp,
            "dropout": dropout,
            "share_norm_output": share_norm_output,
            "bits": bits,
            "table": table,
            "affine": affine,
            "fused_loss": fused_loss,
            "verify": verify,
            "min_keep_weight": min_keep_weight,
            "tolerance": tolerance,
        }
        # Built once; a keyword given together with `config` is an error that names it.
        self.config = ConversionConfig.build(config, **{name: value for name, value in options.items() if value is not None})
        self._filter = filter
        self._example_input = example_input
        self._probe_samples = probe_samples
        self.report: ConversionReport | None = None
        self._converted: weakref.ref[nn.Module] | None = None
        self._memory_budget = memory_budget if memory_budget is None else read_budget(memory_budget)
        if offload is not False and memory_budget is None:
            raise ValueError("`offload` is a lever of the memory budget planner: give `memory_budget` with it.")
        self._offload = offload
        self.memory_plan: CheckpointPlan | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self._converted is not None and self._converted() is pl_module):
            return
        _drop_pending(pl_module)  # left by an earlier call that never reached the hook
        if isinstance(trainer.strategy, ModelParallelStrategy):
            hook, wrapper = "configure_model", self._convert_before_sharding(trainer, pl_module)
        else:
            # convert after the last model hook Lightning will call (`configure_model` only if overridden)
            hook = _MODEL_HOOKS[-1] if is_overridden(_MODEL_HOOKS[-1], pl_module) else _MODEL_HOOKS[0]
            wrapper = self._convert_after(getattr(pl_module, hook), trainer, pl_module)
        # what to put back: an attribute the instance had itself, else nothing (the class's method)
        setattr(wrapper, _PENDING, vars(pl_module).get(hook))
        setattr(pl_module, hook, wrapper)

    def _convert_after(
        self, original: Callable[..., Any], trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Callable[..., Any]:
        def hook_then_convert(*args: Any, **kwargs: Any) -> Any:
            _drop_pending(pl_module)  # the original hook is back before anything can fail
            output = original(*args, **kwargs)
            self._convert(trainer, pl_module)
            return output

        return hook_then_convert

    def _convert_before_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[..., Any]:
        """Under ``ModelParallelStrategy``: convert what exists before the user's ``configure_model``
        shards it, and what ``configure_model`` builds after it (sharded or not).

        Layers built in ``__init__``/``setup`` are converted before, with their real values; when
        ``configure_model`` builds layers, the model is converted (again: what is converted stays
        as it is) after it, or, if the user called ``convert`` there, only reported. A memory budget
        is planned once, after ``configure_model``: for the model as it will train (per rank when it
        sharded it).
        """
        original = pl_module.configure_model

        def convert_around_hook(*args: Any, **kwargs: Any) -> Any:
            _drop_pending(pl_module)
            before = {id(module) for module in pl_module.modules()}
            converted_before = any(True for _ in pl_module.parameters())
            if converted_before:
                self._convert(trainer, pl_module, budget=False)
                before = {id(module) for module in pl_module.modules()}
            output = original(*args, **kwargs)
            built = [m for m in pl_module.modules() if id(m) not in before and any(True for _ in m.parameters(False))]
            if built and self.report is None and _converted_by_user(pl_module):
                self.report = _report_user_conversion(pl_module)
                rank_zero_info(str(self.report))
            elif built:
                self._convert(trainer, pl_module)
            elif converted_before and self._memory_budget is not None:
                self._fit_budget(trainer, pl_module)
            return output

        return convert_around_hook

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a fit that failed before the hook ran must not leave a wrapper that converts in a later `validate`
        _drop_pending(pl_module)

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, budget: bool = True) -> None:
        _refuse_sharded(pl_module)
        failure: BaseException | None = None
        for probe, label in self._probes(trainer, pl_module):
            try:
                report = convert(pl_module, probe=probe, probe_label=label, config=self.config, filter=self._filter)
                break
            except ProbeError as error:
                if not isinstance(error.__cause__, ProbeUnavailable):
                    raise
                failure = error.__cause__.__cause__
        else:
            if failure is not None:
                shapes_only = (
                    " On a model without values (meta device, or sharded: the probe then runs on shapes only) "
                    "training_step cannot read values, e.g. `loss.item()`."
                    if has_no_values(pl_module) or sharded_modules(pl_module) else ""
                )
                rank_zero_warn(
                    f"ApproxBP: training_step could not run on the probe batch at setup ({failure!r}); "
                    f"converting without a probe.{shapes_only} Set `example_input_array` for the full conversion."
                )
            report = convert(pl_module, config=self.config, filter=self._filter)
        self.report = report
        self._converted = weakref.ref(pl_module)
        rank_zero_info(str(report))
        if budget and self._memory_budget is not None:
            self._fit_budget(trainer, pl_module)

    def _fit_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan and apply the checkpointing (and offload) that makes the simulated step fit ``memory_budget``."""
        device = trainer.strategy.root_device
        budget = parse_budget(self._memory_budget, device)
        example, step = self._budget_batch(trainer, pl_module)
        if example is None:
            raise ValueError(
                "ApproxBP(memory_budget=...) needs one batch to simulate the step: pass example_input, set "
                "example_input_array, or give the model or datamodule a train_dataloader."
            )
        if sharded_modules(pl_module):
            self.memory_plan = self._sharded_plan(trainer, pl_module, example, step, budget)
        else:
            self.memory_plan = plan_checkpointing(
                pl_module, example, budget, step=step, precision=str(trainer.precision),
                optimizer=configured_optimizer, share=(trainer,), offload=self._offload, device=device,
            )
        apply_plan(pl_module, self.memory_plan)
        rank_zero_info(str(self.memory_plan))

    def _sharded_plan(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any, step: Any, budget: int
    ) -> CheckpointPlan:
        """The plan for one rank of a model sharded with ``fully_shard``: every rank simulates its own shard
        (all equal in size: FSDP2 pads them to rank 0's), then rank 0's plan, or its error, is broadcast, so
        every rank applies the same plan (or raises the same error) whatever its own batch was."""
        if self._offload is not False:
            raise ValueError(
                "ApproxBP(memory_budget=..., offload=...) is not supported on a model sharded with fully_shard: "
                "drop offload (the budget is then met by checkpointing alone)."
            )
        share: tuple[object, ...] = (trainer, *([pl_module._device_mesh] if pl_module._device_mesh is not None else []))
        outcome: tuple[str, Any]
        try:
            outcome = ("plan", plan_sharded_checkpointing(
                pl_module, example, budget, step=step, precision=str(trainer.precision),
                optimizer=configured_optimizer, share=share,
            ))
        except ValueError as error:
            outcome = ("error", str(error))
        except Exception as error:  # noqa: BLE001 - every rank must reach the broadcast, or the others hang in it
            outcome = ("failure", f"{type(error).__name__}: {error}")
        outcome = trainer.strategy.broadcast(outcome, src=0)
        size = shard_group_size(pl_module)
        where = f"one rank of the model sharded with fully_shard over {size} rank{'s' if size != 1 else ''}"
        if outcome[0] == "error":
            raise ValueError(f"{outcome[1]} (Simulated for {where}.)")
        if outcome[0] == "failure":
            raise RuntimeError(f"ApproxBP(memory_budget=...) could not simulate the step of {where}: {outcome[1]}")
        rank_zero_info(f"ApproxBP: the memory budget is per rank, simulated for {where}.")
        return outcome[1]

    def _budget_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, Any]:
        """The whole batch to simulate and the step for it (``None`` for a forward)."""
        if self._example_input is not None:
            return self._example_input, None
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array, None
        return _first_train_batch(trainer, pl_module), training_step_loss

    def _probes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[ProbeFn, str]]:
        """The probes to try, in order, each with its report label; empty when there is none."""
        if self._example_input is not None:
            return [(probe_from_example(self._example_input), "example_input")]
        if pl_module.example_input_array is not None:
            return [(probe_from_example(pl_module.example_input_array), "example_input_array")]
        if not pl_module.automatic_optimization:
            return []  # a manual training_step needs optimizers, which do not exist yet
        batch = _first_train_batch(trainer, pl_module)
        if batch is None:
            return []
        whole, samples = _training_step_probe(batch), self._probe_samples
        size = _leading_size(batch)
        if size is None:
            return [(whole, f"{_TRAIN_BATCH} (whole: its tensors have no common leading size)")]
        if size <= samples:
            return [(whole, f"training_step on all {size} samples of the first train batch")]
        try:
            sliced = _first_samples(batch, samples)
        except Exception as error:  # noqa: BLE001 - e.g. a registered container that does not rebuild from its leaves
            return [(whole, f"{_TRAIN_BATCH} (whole: slicing it failed with {error!r})")]
        return [
            (_training_step_probe(sliced), f"training_step on {samples} of {size} samples of the first train batch"),
            # a step may need the whole batch (e.g. a non-tensor field of batch length)
            (whole, f"training_step on all {size} samples of the first train batch (it failed on {samples})"),
        ]


def _refuse_sharded(pl_module: pl.LightningModule) -> None:
    """Raise when FSDP1 or tensor parallelism already manage modules: replacing them now would break them
    (FSDP2's ``fully_shard`` is followed, see :mod:`~lightning_approxbp.conversion.sharded`)."""
    sharded = sharded_modules(pl_module)
    why = why_not_convertible(pl_module) if sharded else None
    if why is not None:
        raise RuntimeError(
            f"ApproxBP must convert the model before it is sharded here: {describe(sharded)} are sharded and {why}, "
            "which keeps per-module state that replaced modules would break. Build the layers in `__init__` or "
            "`setup` (the callback then converts them before `configure_model` runs), or call "
            "`lightning_approxbp.convert(model, example_input)` in `configure_model` before "
            "`parallelize_module`/FSDP (the callback then leaves the model alone)."
        )


def _report_user_conversion(pl_module: pl.LightningModule) -> ConversionReport:
    """What the user's own ``convert`` call in ``configure_model`` left in the model."""
    report = ConversionReport(probe="none: converted by the user")
    for fqn, module in pl_module.named_modules():
        if type(module).__module__.startswith("lightning_approxbp."):
            report.add(fqn, type(module).__name__, "unchanged", reason="converted by the user (convert() in configure_model)")
    report.notes.append(
        "the model was converted in configure_model before ApproxBP saw it; ApproxBP changed nothing "
        "(its options do not apply)."
    )
    return report


def _converted_by_user(pl_module: pl.LightningModule) -> bool:
    """Whether the model already holds modules of this package (``convert`` called in ``configure_model``)."""
    return any(
        cls.__module__.startswith("lightning_approxbp.") for module in pl_module.modules() for cls in type(module).__mro__
    )


def _drop_pending(pl_module: pl.LightningModule) -> None:
    """Remove the temporary hook wrapper of :meth:`ApproxBP.setup` from the instance, if there."""
    for hook in _MODEL_HOOKS:
        wrapper = vars(pl_module).get(hook)
        if hasattr(wrapper, _PENDING):
            delattr(pl_module, hook)
            if (own := getattr(wrapper, _PENDING)) is not None:
                setattr(pl_module, hook, own)


def _first_train_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("train_dataloader", datamodule):
        source: Callable[[], Any] = datamodule.train_dataloader
    elif is_overridden("train_dataloader", pl_module):
        source = pl_module.train_dataloader
    else:
        return None
    with isolate_rng():
        loader = source()
        if isinstance(loader, (dict, list, tuple)):
            return None  # several loaders: the step's batch structure is not one loader's batch
        return next(iter(loader), None)


def _leading_size(batch: Any) -> int | None:
    """The size of dim 0 shared by all tensors of ``batch``; ``None`` without one."""
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in tree_flatten(batch)[0] if isinstance(leaf, Tensor)}
    return sizes.pop() if len(sizes) == 1 else None


def _first_samples(batch: Any, samples: int) -> Any:
    """``batch`` with every tensor cut to its first ``samples`` rows; other leaves as they are."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([leaf[:samples] if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)


def _training_step_probe(batch: Any) -> ProbeFn:
    def probe(module: nn.Module) -> Any:
        module.log = module.log_dict = _ignore  # type: ignore[method-assign]
        # a model without values (meta device, or the skeleton of a sharded one) runs on shapes only
        inputs = tree_map(_to_meta, batch) if has_no_values(module) else batch
        try:
            output = module.training_step(inputs, 0)
        except Exception as error:
            raise ProbeUnavailable from error
        finally:
            del module.log, module.log_dict
        return output["loss"] if isinstance(output, dict) else output

    return probe


def _to_meta(leaf: Any) -> Any:
    return leaf.to("meta") if isinstance(leaf, Tensor) else leaf


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
