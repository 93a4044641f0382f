r"""
ApproxBPPrecision
=================

A Lightning precision plugin for fine-tuning with Approx-BP / MS-BP layers.
``ApproxBPPrecision(precision)`` returns an instance of Lightning's own plugin class for that
precision (``MixedPrecision``, ``HalfPrecision``, ``Precision`` or ``DoublePrecision``),
extended with what the memory-saving layers need to pay off under reduced precision. So
Lightning, its callbacks and its checkpoints treat it as Lightning's plugin.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import torch
from lightning.fabric.connector import (
    _PRECISION_INPUT,
    _convert_precision_to_unified_args,
)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_approxbp.plugins.module_transforms import (
    follow_input_dtype,
    recast_trainable_weights,
    store_frozen_weights,
)

PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")

_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16, "32": torch.float32, "64": torch.float64}
# Strategies that own the module's dtypes. FSDP and XLA strategies are not listed: they refuse any
# precision plugin but their own (FSDPPrecision, XLAPrecision) before this check could run.
_UNSUPPORTED_STRATEGIES = (ModelParallelStrategy, DeepSpeedStrategy)


class _PicksPrecisionFamily(type):
    """Makes ``ApproxBPPrecision(...)`` build the subclass for its precision.

    A metaclass rather than ``__new__``: LightningCLI reads the YAML arguments and their help
    from ``__init__`` and the class docstring, and copies and pickles need nothing special.
    """

    def __call__(
        cls,
        precision: _PRECISION_INPUT = "bf16-mixed",
        device: str | None = None,
        store_frozen_weights: bool = True,
        recast_trainable_weights: bool = True,
    ) -> ApproxBPPrecision:
        if cls is ApproxBPPrecision:
            cls = _FAMILIES[_canonical_precision(precision)]
        return super().__call__(precision, device, store_frozen_weights, recast_trainable_weights)


class ApproxBPPrecision(Precision, metaclass=_PicksPrecisionFamily):
    r"""Lightning precision plugin that lets the ApproxBP layers save memory under reduced precision.

    Pass it instead of ``precision=``. Calling ``ApproxBPPrecision(precision)`` returns an
    instance of the subclass for that precision, which is also Lightning's plugin class for it:

    - ``"16-mixed"``, ``"bf16-mixed"``: :class:`ApproxBPMixedPrecision`, a ``MixedPrecision``;
    - ``"16-true"``, ``"bf16-true"``: :class:`ApproxBPHalfPrecision`, a ``HalfPrecision``;
    - ``"32-true"``: :class:`ApproxBPSinglePrecision`, a ``Precision``;
    - ``"64-true"``: :class:`ApproxBPDoublePrecision`, a ``DoublePrecision``.

    So every hook is Lightning's (autocast, ``GradScaler``, input casting), and code that checks
    the plugin's type (``ThroughputMonitor``'s FLOPs dtype, Lightning's checkpoint connector)
    sees the right one. ``isinstance(plugin, ApproxBPPrecision)`` is true for all of them.
    Lightning's aliases are accepted and stored as Lightning's canonical strings (``16`` and
    ``"16"`` -> ``"16-mixed"``, ``"bf16"`` -> ``"bf16-mixed"``, ``32`` and ``"32"`` ->
    ``"32-true"``, ``64`` and ``"64"`` -> ``"64-true"``). On top of Lightning's plugin:

    - **Frozen weights stored in the autocast dtype** (``"16-mixed"``, ``"bf16-mixed"``). The
      weight (and bias) of frozen ``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers ``Conv1D``
      and the ApproxBP merged linears are stored in the autocast dtype. Autocast rounds them to exactly these values at
      every call, so the forward is bit-identical; but no per-step half-precision copy of each
      frozen weight is made and kept for backward, and the weights take half the memory.
      This is what LoRA and frozen-backbone fine-tuning gain. Trainable weights stay fp32
      (the optimizer needs fp32 master weights). The original dtypes come back in ``teardown``
      (values stay rounded), so the module runs without autocast after ``fit``.
    - **Trainable linear weights cast again in backward** (``"16-mixed"``, ``"bf16-mixed"``).
      Autocast gives every ``nn.Linear`` call a half-precision copy of its weight, and autograd
      keeps that copy until the layer's backward: half the model's size, held through the whole
      forward. Exact ``nn.Linear`` layers with a trainable weight instead save a reference to
      the fp32 weight and cast it again in backward (one cast per layer and step). Outputs and
      gradients are bit-identical to autocast's (tested). The ApproxBP merged linears already
      work this way.
    - **Memory-sharing norms emit the training dtype.** Under ``"*-mixed"`` the ApproxBP norms
      follow autocast by default, so the norm and the layer it feeds save one half-precision
      tensor. Under ``"16-true"``, ``"bf16-true"`` and ``"64-true"`` a norm built with an
      explicit ``output_dtype`` of another width is reset to follow its input, as its consumer
      now has weights in the training dtype.
    - **Loss scaling** under ``"16-mixed"`` is Lightning's ``GradScaler`` logic, unchanged:
      the ApproxBP backward passes propagate ``inf``/``NaN`` so the scaler still skips the step.
    - **Checkpoints interchangeable with Lightning's plugin.** The plugin state (the
      ``GradScaler`` under ``"16-mixed"``) is saved under the name of the Lightning class
      (``checkpoint["MixedPrecision"]``), so a checkpoint saved with ``Trainer(precision=...)``
      resumes with this plugin and the other way round.
    - **Clear errors** for unknown precision values and for strategies that need their own
      precision type (ModelParallel, DeepSpeed; FSDP and XLA refuse it themselves).

    The ApproxBP callback works without this plugin (``Trainer(precision="bf16-mixed")``); the
    plugin adds the frozen-weight saving on top (see ``docs/lightning.md`` for measured numbers).

    Args:
        precision: one of ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"``,
            ``"bf16-true"``, ``"64-true"``, or a Lightning alias of one (``16``, ``32``, ``64``,
            ``"16"``, ``"32"``, ``"64"``, ``"bf16"``).
        device: device type for ``torch.autocast`` and the ``GradScaler`` (``"cuda"``, ``"cpu"``,
            ``"mps"``; mixed precision only). Default: the Trainer's root device type, known when
            training starts.
        store_frozen_weights: store frozen weights in the autocast dtype (mixed precision only).
        recast_trainable_weights: cast trainable ``nn.Linear`` weights again in backward instead of
            saving autocast's copy (mixed precision only).

    Raises:
        ValueError: for a precision Lightning does not accept, for ``"transformer-engine*"``
            (use Lightning's plugin), or when a subclass is given another family's precision.
        MisconfigurationException: when used with ModelParallel or DeepSpeed (FSDP and XLA strategies
            refuse it themselves: they take only their own precision plugins).

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.plugins.precision import MixedPrecision
        from lightning_approxbp.callbacks.approxbp import ApproxBP
        from lightning_approxbp.plugins import ApproxBPPrecision

        plugin = ApproxBPPrecision("bf16-mixed")
        assert isinstance(plugin, MixedPrecision) and isinstance(plugin, ApproxBPPrecision)
        trainer = Trainer(callbacks=[ApproxBP()], plugins=[plugin])
    """

    # Lightning's MixedPrecision sets its own; the other families have none.
    scaler: torch.amp.GradScaler | None = None

    def __init__(
        self,
        precision: _PRECISION_INPUT = "bf16-mixed",
        device: str | None = None,
        store_frozen_weights: bool = True,
        recast_trainable_weights: bool = True,
    ) -> None:
        precision = _canonical_precision(precision)
        if not isinstance(self, _FAMILIES[precision]):
            raise ValueError(  # noqa: TRY004 - the value does not fit this class; its type is right
                f"{type(self).__name__} cannot run precision={precision!r}. Use `ApproxBPPrecision({precision!r})`, "
                "which picks the class for each precision."
            )
        self.store_frozen_weights = store_frozen_weights
        self.recast_trainable_weights = recast_trainable_weights
        self._init_family(precision, device)

    def _init_family(self, precision: str, device: str | None) -> None:
        """Initialise the Lightning plugin this class extends, and the family's own state.

        ``Precision`` and ``DoublePrecision`` have no ``__init__``: their ``precision`` is a class attribute.
        """

    @property
    def plugin(self) -> Precision:
        """This plugin itself, which is Lightning's plugin for its precision.

        Kept from when ``ApproxBPPrecision`` held Lightning's plugin inside instead of being it.
        """
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype layers compute in: the autocast or cast dtype, ``torch.float32`` for ``"32-true"``."""
        return _DTYPES[self.precision.split("-")[0]]

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        self._check_strategy(module)
        return super().convert_module(module)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Lightning has just saved `state_dict()` under `type(self).__qualname__`. Under the
        # Lightning class's name instead, the checkpoint is the one Lightning's plugin would save.
        state = checkpoint.pop(type(self).__qualname__, None)
        if state is not None:
            checkpoint[self._lightning_class.__qualname__] = state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Lightning then looks up `type(self).__qualname__`, which `on_save_checkpoint` never
        # writes. "ApproxBPPrecision" is where the earlier version of this plugin saved its state.
        for key in (self._lightning_class.__qualname__, ApproxBPPrecision.__qualname__):
            if key in checkpoint:
                self.load_state_dict(checkpoint[key])
                return

    @property
    def _lightning_class(self) -> type[Precision]:
        """The Lightning plugin class this one extends: ``MixedPrecision``, ``HalfPrecision``, ..."""
        return next(cls for cls in type(self).__mro__ if not issubclass(cls, ApproxBPPrecision))

    def _check_strategy(self, module: nn.Module) -> None:
        trainer = _attached_trainer(module)
        if trainer is None:
            return
        name = type(trainer.strategy).__name__
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"ApproxBPPrecision does not work with {name}: that strategy needs its own precision plugin. "
                f"Remove the plugin and pass `Trainer(precision={self.precision!r})` instead; the ApproxBP callback "
                "saves activation memory without it (only this plugin's weight-copy savings are lost)."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(precision={self.precision!r}, store_frozen_weights={self.store_frozen_weights}, "
            f"recast_trainable_weights={self.recast_trainable_weights})"
        )


class ApproxBPMixedPrecision(ApproxBPPrecision, MixedPrecision):
    """``ApproxBPPrecision("16-mixed")`` and ``("bf16-mixed")``: Lightning's ``MixedPrecision``
    (autocast, ``GradScaler``) plus frozen weights stored in the autocast dtype and trainable
    linear weights cast again in backward. See :class:`ApproxBPPrecision`."""

    @override
    def _init_family(self, precision: str, device: str | None) -> None:
        MixedPrecision.__init__(self, precision, device or _default_device_type())  # type: ignore[arg-type]
        self._explicit_device = device
        self._stored: WeakKeyDictionary[nn.Parameter, torch.dtype] = WeakKeyDictionary()
        self._recasting: WeakSet[nn.Linear] = WeakSet()

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        self._bind_device(module)
        if self.store_frozen_weights:
            self._store_frozen_weights(module)
        if self.recast_trainable_weights:
            self._recasting.update(recast_trainable_weights(module))
        return module

    @override
    def teardown(self) -> None:
        for param, dtype in list(self._stored.items()):
            param.data = param.data.to(dtype)
        self._stored.clear()
        for linear in list(self._recasting):
            linear.__dict__.pop("forward", None)
        self._recasting.clear()
        super().teardown()

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the plugin into each process; weak containers do not pickle, and what
        # they track (changed modules) belongs to this process's model only.
        state = self.__dict__.copy()
        state["_stored"], state["_recasting"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stored, self._recasting = WeakKeyDictionary(), WeakSet()

    def _bind_device(self, module: nn.Module) -> None:
        """Follow the Trainer's device type unless ``device`` was given, as Lightning's own plugin would be built."""
        trainer = _attached_trainer(module)
        if self._explicit_device is not None or trainer is None:
            return
        device_type = trainer.strategy.root_device.type
        if device_type != self.device:
            # Still before the checkpoint's scaler state is restored, so a fresh scaler loses nothing.
            MixedPrecision.__init__(self, self.precision, device_type)  # type: ignore[arg-type]

    def _store_frozen_weights(self, module: nn.Module) -> None:
        converted = store_frozen_weights(module, self.compute_dtype)
        self._stored.update(converted)
        if converted:
            bits = sum(p.numel() * (torch.finfo(old).bits - torch.finfo(p.dtype).bits) for p, old in converted.items())
            saved = bits // 8
            rank_zero_info(
                f"ApproxBPPrecision: stored {len(converted)} frozen weight tensors in {self.compute_dtype} "
                f"({saved / 2**20:.1f} MiB less parameter memory, no per-step autocast copies)."
            )


class ApproxBPHalfPrecision(ApproxBPPrecision, HalfPrecision):
    """``ApproxBPPrecision("16-true")`` and ``("bf16-true")``: Lightning's ``HalfPrecision`` plus
    memory-sharing norms that emit the training dtype. See :class:`ApproxBPPrecision`."""

    @override
    def _init_family(self, precision: str, device: str | None) -> None:
        HalfPrecision.__init__(self, precision)  # type: ignore[arg-type]

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        follow_input_dtype(module, self.compute_dtype)
        return module


class ApproxBPSinglePrecision(ApproxBPPrecision):
    """``ApproxBPPrecision("32-true")``: Lightning's ``Precision`` (fp32) unchanged, with the
    strategy check of :class:`ApproxBPPrecision`. The ApproxBP callback saves activation memory
    in fp32 without any plugin."""


class ApproxBPDoublePrecision(ApproxBPPrecision, DoublePrecision):
    """``ApproxBPPrecision("64-true")``: Lightning's ``DoublePrecision`` plus memory-sharing norms
    that emit the training dtype. See :class:`ApproxBPPrecision`."""

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        follow_input_dtype(module, self.compute_dtype)
        return module


_FAMILIES: dict[str, type[ApproxBPPrecision]] = {
    "32-true": ApproxBPSinglePrecision,
    "16-mixed": ApproxBPMixedPrecision,
    "bf16-mixed": ApproxBPMixedPrecision,
    "16-true": ApproxBPHalfPrecision,
    "bf16-true": ApproxBPHalfPrecision,
    "64-true": ApproxBPDoublePrecision,
}


def _canonical_precision(precision: _PRECISION_INPUT) -> str:
    """Lightning's canonical string for ``precision``, with Lightning's own alias conversion (and its warnings)."""
    try:
        canonical: str | None = _convert_precision_to_unified_args(precision)
    except ValueError:
        canonical = None
    if canonical in ("transformer-engine", "transformer-engine-float16"):
        raise ValueError(
            f"ApproxBPPrecision(precision={precision!r}) is not supported: it needs Lightning's "
            f"TransformerEnginePrecision. Remove the plugin and pass `Trainer(precision={canonical!r})`; "
            "the ApproxBP callback saves activation memory without it."
        )
    if canonical not in _FAMILIES:
        raise ValueError(
            f"ApproxBPPrecision(precision={precision!r}) is not supported. Choose one of: {', '.join(PRECISIONS)} "
            "(Lightning's aliases 16, 32, 64, '16', '32', '64' and 'bf16' work too)."
        )
    return canonical


def _attached_trainer(module: nn.Module) -> Trainer | None:
    if not isinstance(module, LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # not attached
        return None


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
