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
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from typing_extensions import override

from lightning_approxbp.conversion import ConversionConfig, ConversionReport, convert
from lightning_approxbp.conversion.config import DEFAULT_MIN_KEEP_WEIGHT
from lightning_approxbp.conversion.probe import ProbeFn, probe_from_example
from lightning_approxbp.conversion.walker import ModuleFilter
from lightning_approxbp.tables import StepTable


class ProbeUnavailable(Exception):
    """The training step could not run on the probe batch at setup time."""


class ApproxBP(Callback):
    r"""Lower the activation memory of fine-tuning without changing what the model computes.

    At ``setup("fit")`` (before the device move, DDP/FSDP wrapping and ``configure_optimizers``)
    the LightningModule is converted in place by :func:`~lightning_approxbp.conversion.convert`:

    - GELU/SiLU-family activations keep their exact forward and save ``bits`` per element for
      a step-function derivative (the only approximation: gradients through activations);
    - LayerNorm/RMSNorm modules save their output (shared with the next layer) instead of their
      input; their affine is merged into the consuming linear layers at compute time (exact,
      parameters unchanged) or kept with output-based recovery.

    The probe batch that traces the model is, in order: ``example_input`` given here,
    ``pl_module.example_input_array`` (passed to ``forward``), or the first batch of
    ``trainer.datamodule.train_dataloader()`` / ``pl_module.train_dataloader()`` (passed to
    ``training_step`` with logging disabled), drawn under :func:`isolate_rng`. Dataloaders
    passed straight to ``Trainer.fit`` are not reachable at setup; without any probe batch
    only activations and safe affine-kept norms are converted (the report says so).

    If the module overrides ``configure_model``, the conversion runs right after it, so layers
    built there are included. The state dict keys and values do not change: checkpoints saved
    with this callback load strictly into the unconverted module, and resuming works.

    The report is printed once on rank zero and kept as :attr:`report`.

    Args:
        activations: convert activations.
        norms: convert norms.
        gated_mlp: fuse gated MLPs' down projections (saves gate and up outputs only; exact).
        dropout: make ``nn.Dropout`` modules redraw their mask in backward instead of saving it.
        bits: bits per activation element (1, 2 or 4).
        table: ``"fitted"``, ``"paper"`` or a :class:`~lightning_approxbp.tables.StepTable`.
        affine: ``"auto"``, ``"merge"`` or ``"keep"``; see
            :class:`~lightning_approxbp.conversion.ConversionConfig`.
        verify: check the converted output on the probe batch; raise if it differs.
        filter: ``(module, fqn) -> bool`` choosing which norms/activations are considered.
        example_input: a forward input used as the probe batch.
        min_keep_weight: smallest ``|weight|`` for which a norm keeps its affine.
        tolerance: relative output error accepted by ``verify`` (default per dtype).
        config: all of the conversion options above as one
            :class:`~lightning_approxbp.conversion.ConversionConfig`, instead of the arguments.

    Raises:
        ValueError: at construction, for unknown or conflicting options.
        RuntimeError: in ``setup`` if verification finds a different output.

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
        activations: bool = True,
        norms: bool = True,
        gated_mlp: bool = True,
        dropout: bool = True,
        bits: int = 2,
        table: StepTable | str = "fitted",
        affine: str = "auto",
        verify: bool = True,
        filter: ModuleFilter | None = None,  # noqa: A002 - same name as convert()
        example_input: Any = None,
        min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT,
        tolerance: float | None = None,
        config: ConversionConfig | None = None,
    ) -> None:
        options = {
            "activations": activations,
            "norms": norms,
            "gated_mlp": gated_mlp,
            "dropout": dropout,
            "bits": bits,
            "table": table,
            "affine": affine,
            "verify": verify,
            "min_keep_weight": min_keep_weight,
            "tolerance": tolerance,
        }
        defaults = ConversionConfig()
        changed = {name: value for name, value in options.items() if value != getattr(defaults, name)}
        self.config = ConversionConfig.build(config, **changed) if config is not None else ConversionConfig(**options)
        self._filter = filter
        self._example_input = example_input
        self.report: ConversionReport | None = None
        self._converted: weakref.ref[nn.Module] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._convert_or_defer(trainer, pl_module)

    def _convert_or_defer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._converted is not None and self._converted() is pl_module:
            return
        if not is_overridden("configure_model", pl_module):
            self._convert(trainer, pl_module)
            return
        original = pl_module.configure_model

        def configure_model_then_convert() -> None:
            del pl_module.configure_model  # back to the class's method
            original()
            self._convert(trainer, pl_module)

        pl_module.configure_model = configure_model_then_convert

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe, label = self._probe(trainer, pl_module)
        try:
            report = convert(pl_module, probe=probe, probe_label=label, config=self.config, filter=self._filter)
        except ProbeUnavailable as error:
            rank_zero_warn(
                f"ApproxBP: training_step could not run on the probe batch at setup ({error.__cause__!r}); "
                "converting without a probe. Set `example_input_array` for the full conversion."
            )
            report = convert(pl_module, config=self.config, filter=self._filter)
        self.report = report
        self._converted = weakref.ref(pl_module)
        rank_zero_info(str(report))

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[ProbeFn | None, str | None]:
        if self._example_input is not None:
            return probe_from_example(self._example_input), "example_input"
        if pl_module.example_input_array is not None:
            return probe_from_example(pl_module.example_input_array), "example_input_array"
        if not pl_module.automatic_optimization:
            return None, None  # a manual training_step needs optimizers, which do not exist yet
        batch = _first_train_batch(trainer, pl_module)
        if batch is None:
            return None, None
        return _training_step_probe(batch), "training_step on the first train batch"


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


def _training_step_probe(batch: Any) -> ProbeFn:
    def probe(module: nn.Module) -> Any:
        module.log = module.log_dict = _ignore  # type: ignore[method-assign]
        try:
            output = module.training_step(batch, 0)
        except Exception as error:
            raise ProbeUnavailable from error
        finally:
            del module.log, module.log_dict
        return output["loss"] if isinstance(output, dict) else output

    return probe


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
