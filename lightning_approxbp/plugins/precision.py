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

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary, WeakSet, ref

import torch
from lightning.fabric.connector import (
    _convert_precision_to_unified_args,
)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    FSDPPrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_approxbp.errors import OptionError
from lightning_approxbp.ops._utils import cpu_computes_natively
from lightning_approxbp.plugins.module_transforms import (
    follow_input_dtype,
    recast_trainable_weights,
    store_frozen_weights,
)

PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
AUTO = "auto"
# Checked by `_canonical_precision`, not by the annotation: against a Literal, LightningCLI
# (jsonargparse) answers a typo with some fifty lines of nested union errors.
_PRECISION_OR_AUTO = str | int
_ALIASES: tuple[str, ...] = ("16", "32", "64", "bf16")

_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16, "32": torch.float32, "64": torch.float64}
# What FSDPStrategy (FSDP1) runs: Lightning's FSDPPrecision takes every precision but "64-true".
_FSDP_PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


class _PicksPrecisionFamily(type):
    """Makes ``ApproxBPPrecision(...)`` build the subclass for its precision.

    A metaclass rather than ``__new__``: LightningCLI reads the YAML arguments and their help
    from ``__init__`` and the class docstring, and copies and pickles need nothing special.
    """

    def __call__(
        cls,
        precision: _PRECISION_OR_AUTO = "bf16-mixed",
        device: str | None = None,
        store_frozen_weights: bool = True,
        recast_trainable_weights: bool = True,
    ) -> ApproxBPPrecision:
        if precision == AUTO:
            precision = _announce(*choose_precision(device))
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
    ``"32-true"``, ``64`` and ``"64"`` -> ``"64-true"``); ``"auto"`` picks by hardware (below).
    On top of Lightning's plugin:

    - **Frozen weights stored in the autocast dtype** (``"16-mixed"``, ``"bf16-mixed"``). The
      weight (and bias) of frozen ``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers ``Conv1D``
      and the ApproxBP merged linears are stored in the autocast dtype. Autocast rounds them to exactly these values at
      every call, so the forward is bit-identical; but no per-step half-precision copy of each
      frozen weight is made and kept for backward, and the weights take half the memory.
      This is what LoRA and frozen-backbone fine-tuning gain. Trainable weights stay fp32
      (the optimizer needs fp32 master weights). Frozen/trainable status is followed during
      fit: a stored weight that requires grad again (e.g. unfrozen by ``BackboneFinetuning``)
      gets its original dtype back before the next step's forward (same ``Parameter``, so
      optimizer param groups stay valid and its optimizer state is created in fp32), and its
      ``nn.Linear`` the recast below. A weight frozen during fit stays fp32 (storing it would
      round trained master weights). The original dtypes come back in ``teardown``. What
      differs from the module as given: the values of weights that were stored, frozen at the
      start of fit, are rounded to the autocast dtype (the values autocast computed with), also
      when they were unfrozen and trained later (training starts from the rounded values).
      Sharded (``DTensor``) weights under ``ModelParallelStrategy`` are not stored: FSDP2's
      ``MixedPrecisionPolicy`` does that.
    - **Trainable linear weights cast again in backward** (``"16-mixed"``, ``"bf16-mixed"``).
      Autocast gives every ``nn.Linear`` call a half-precision copy of its weight, and autograd
      keeps that copy until the layer's backward: half the model's size, held through the whole
      forward. Exact ``nn.Linear`` layers with a trainable weight instead save a reference to
      the fp32 weight and cast it again in backward (one cast per layer and step). Outputs and
      gradients are bit-identical to autocast's (tested). The ApproxBP merged linears already
      work this way. Under FSDP2 the gathered weight is recast the same way; a tensor-parallel
      (``DTensor``) weight runs DTensor's own linear.
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
    - **Strategies.** Single device, DDP and ``ModelParallelStrategy`` (FSDP2 ``fully_shard``,
      tested against DDP on two CPU processes). ``FSDPStrategy`` (FSDP1) takes only
      ``FSDPPrecision`` plugins: pass :class:`ApproxBPFSDPPrecision` there. DeepSpeed raises an
      error that says what to use instead; XLA strategies refuse it themselves.

    The ApproxBP callback works without this plugin (``Trainer(precision="bf16-mixed")``); the
    plugin adds the frozen-weight saving on top (see ``docs/lightning.md`` for measured numbers).

    Args:
        precision: one of ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"``,
            ``"bf16-true"``, ``"64-true"``, a Lightning alias of one (``16``, ``32``, ``64``,
            ``"16"``, ``"32"``, ``"64"``, ``"bf16"``), or ``"auto"``: ``"bf16-mixed"`` where
            ``device`` computes bf16 natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or
            AMX), ``"16-mixed"`` on older CUDA GPUs, ``"32-true"`` elsewhere (an emulated bf16
            matmul is several times slower than fp32). The choice is logged once, on rank zero,
            and is what ``precision`` holds afterwards (see :func:`choose_precision`).
        device: device type for ``torch.autocast`` and the ``GradScaler`` (``"cuda"``, ``"cpu"``,
            ``"mps"``; mixed precision only). Default: the Trainer's root device type, known when
            training starts. With ``"auto"``, also the device whose capabilities decide (default:
            CUDA when available, else the CPU), since the choice is made at construction.
        store_frozen_weights: store frozen weights in the autocast dtype (mixed precision only).
        recast_trainable_weights: cast trainable ``nn.Linear`` weights again in backward instead of
            saving autocast's copy (mixed precision only).

    Raises:
        ValueError: for a precision Lightning does not accept, for ``"transformer-engine*"``
            (use Lightning's plugin), or when a subclass is given another family's precision.
        MisconfigurationException: at setup, with DeepSpeed (its own precision plugin owns the
            weights), or with ``FSDPStrategy`` (use :class:`ApproxBPFSDPPrecision`).

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
        precision: _PRECISION_OR_AUTO = "bf16-mixed",
        device: str | None = None,
        store_frozen_weights: bool = True,
        recast_trainable_weights: bool = True,
    ) -> None:
        precision = _canonical_precision(precision)
        self._check_precision(precision)
        self.store_frozen_weights = store_frozen_weights
        self.recast_trainable_weights = recast_trainable_weights
        self._init_family(precision, device)

    def _check_precision(self, precision: str) -> None:
        if not isinstance(self, _FAMILIES[precision]):
            raise ValueError(  # noqa: TRY004 - the value does not fit this class; its type is right
                f"{type(self).__name__} cannot run precision={precision!r}. Use `ApproxBPPrecision({precision!r})`, "
                "which picks the class for each precision."
            )

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
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                "ApproxBPPrecision does not work with DeepSpeedStrategy: DeepSpeed casts and partitions the weights "
                "itself, with its own precision plugin. To shard with this plugin use "
                "`ModelParallelStrategy` with `fully_shard` (FSDP2) and `ApproxBPPrecision(...)`, or `FSDPStrategy` "
                "with `ApproxBPFSDPPrecision(...)`. To keep DeepSpeed, remove the plugin and pass "
                f"`Trainer(precision={self.precision!r})`; the ApproxBP callback saves activation memory without it."
            )
        if isinstance(trainer.strategy, FSDPStrategy) != isinstance(self, FSDPPrecision):
            raise MisconfigurationException(
                f"{type(self).__name__} is not for {type(trainer.strategy).__name__}: use "
                f"`ApproxBPFSDPPrecision({self.precision!r})` with `FSDPStrategy` and `ApproxBPPrecision({self.precision!r})` "
                "with every other strategy."
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
        self._module: ref[nn.Module] | None = None  # what `convert_module` changed, to recast in later

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        self._bind_device(module)
        self._module = ref(module)
        if self.store_frozen_weights:
            self._store_frozen_weights(module)
        if self.recast_trainable_weights:
            self._recasting.update(recast_trainable_weights(module))
        return module

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # Lightning enters this around every training/validation/test/predict step, so the first
        # forward after a callback unfroze weights (BackboneFinetuning: `on_train_epoch_start`)
        # and the optimizer step after it see them in fp32.
        self._follow_unfrozen()
        with super().forward_context():
            yield

    @override
    def teardown(self) -> None:
        for param, dtype in list(self._stored.items()):
            param.data = param.data.to(dtype)
        self._stored.clear()
        for linear in list(self._recasting):
            linear.__dict__.pop("forward", None)
        self._recasting.clear()
        self._module = None
        super().teardown()

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the plugin into each process; weak references do not pickle, and what
        # they track (changed modules) belongs to this process's model only.
        state = self.__dict__.copy()
        state["_stored"], state["_recasting"], state["_module"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stored, self._recasting = WeakKeyDictionary(), WeakSet()

    def _follow_unfrozen(self) -> None:
        """Give stored weights that now require grad their original dtype back, and their linears the recast.

        The parameter objects stay the same, so optimizer param groups that hold them (e.g. added
        by ``BackboneFinetuning``) stay valid; optimizer state is created at the first step that
        has a gradient, after this ran, so it is fp32 too. Only the still-stored weights are
        walked (one ``requires_grad`` read each), nothing once none is left. The values are
        those stored: the originals rounded to the autocast dtype.

        A weight frozen during fit is not stored in half precision: that would round trained
        fp32 master weights, which a later unfreeze could not undo.
        """
        unfrozen = [(param, dtype) for param, dtype in self._stored.items() if param.requires_grad]
        if not unfrozen:
            return
        for param, dtype in unfrozen:
            param.data = param.data.to(dtype)
        # rebuilt, not popped: a key lookup compares parameters with `==`, which is elementwise
        self._stored = WeakKeyDictionary({p: d for p, d in self._stored.items() if not p.requires_grad})
        module = self._module() if self._module is not None else None
        if self.recast_trainable_weights and module is not None:
            self._recasting.update(recast_trainable_weights(module))
        rank_zero_info(
            f"ApproxBPPrecision: {len(unfrozen)} weight tensors stored in {self.compute_dtype} while frozen now require "
            "grad: back to their original dtype (values rounded to the autocast dtype while stored)."
        )

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
        if any(isinstance(p, DTensor) and not p.requires_grad for p in module.parameters()):
            rank_zero_info(
                "ApproxBPPrecision: frozen sharded (DTensor) weights stay in their dtype: FSDP2 gathers them from "
                "buffers it fixed at `fully_shard`. Pass `fully_shard(..., mp_policy=MixedPrecisionPolicy("
                f"param_dtype={self.compute_dtype}))` to gather them in half precision."
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


class ApproxBPFSDPPrecision(ApproxBPPrecision, FSDPPrecision):
    """The plugin for ``FSDPStrategy`` (FSDP1), which takes only ``FSDPPrecision`` plugins:
    Lightning's ``FSDPPrecision`` plus memory-sharing norms that emit the training dtype under
    ``"16-true"``/``"bf16-true"``. ``ApproxBPPrecision`` picks no FSDP class by itself (the
    strategy is not known when the plugin is built): pass this class with ``FSDPStrategy``.

    Frozen weights are not stored in half precision and trainable linears are not recast here:
    FSDP1 flattens each wrapped unit's parameters into one tensor of one dtype, and Lightning's
    ``FSDPPrecision`` already gathers them in the half dtype under ``"*-mixed"``
    (``param_dtype``), so autocast finds no fp32 weight to copy. Precisions: ``"32-true"``,
    ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"`` and their aliases, or ``"auto"``.
    See :class:`ApproxBPPrecision`.
    """

    @override
    def _check_precision(self, precision: str) -> None:
        if precision not in _FSDP_PRECISIONS:
            raise ValueError(
                f"ApproxBPFSDPPrecision cannot run precision={precision!r}: FSDP supports {', '.join(_FSDP_PRECISIONS)}."
            )

    @override
    def _init_family(self, precision: str, device: str | None) -> None:
        FSDPPrecision.__init__(self, precision)  # type: ignore[arg-type]

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        if self.precision.endswith("-true"):
            follow_input_dtype(module, self.compute_dtype)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r})"


_FAMILIES: dict[str, type[ApproxBPPrecision]] = {
    "32-true": ApproxBPSinglePrecision,
    "16-mixed": ApproxBPMixedPrecision,
    "bf16-mixed": ApproxBPMixedPrecision,
    "16-true": ApproxBPHalfPrecision,
    "bf16-true": ApproxBPHalfPrecision,
    "64-true": ApproxBPDoublePrecision,
}


def _canonical_precision(precision: _PRECISION_OR_AUTO) -> str:
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
        raise OptionError(
            "precision", precision, (*PRECISIONS, AUTO), spellings=_ALIASES,
            extra="(Lightning's aliases 16, 32, 64, '16', '32', '64' and 'bf16' work too; 'auto' picks by hardware)",
        )
    return canonical


def choose_precision(device: str | None = None) -> tuple[str, str]:
    """The precision ``ApproxBPPrecision("auto")`` picks for ``device``, and why.

    Half precision pays only where the hardware computes it natively: on a CPU without
    AVX512-BF16/AMX a bf16 matmul is emulated and several times slower than fp32 (measured
    5.7x for a 1024x384 @ 384x1536 linear on an AVX2-only CPU), so there fp32 is faster.

    Args:
        device: ``"cuda"``, ``"cpu"``, ... Default: ``"cuda"`` when CUDA is available, else ``"cpu"``.

    Returns:
        ``(precision, reason)``: ``"bf16-mixed"`` on a CUDA GPU or CPU with native bf16,
        ``"16-mixed"`` on an older CUDA GPU, ``"32-true"`` elsewhere.
    """
    device_type = device or _default_device_type()
    if device_type == "cuda" and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", "this CUDA GPU computes bf16 natively"
        return "16-mixed", "this CUDA GPU has no native bf16 (before Ampere), so fp16 with loss scaling"
    if device_type == "cpu":
        if cpu_computes_natively(torch.bfloat16):
            return "bf16-mixed", "this CPU computes bf16 natively (AVX512-BF16 or AMX)"
        return "32-true", "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 matmuls would be emulated, slower than fp32"
    return "32-true", f"no native half-precision check for device {device_type!r}"


def _announce(precision: str, reason: str) -> str:
    rank_zero_info(f"ApproxBPPrecision('auto') chose {precision!r}: {reason}.")
    return precision


def _attached_trainer(module: nn.Module) -> Trainer | None:
    if not isinstance(module, LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # not attached
        return None


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
