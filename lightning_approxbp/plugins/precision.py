r"""
ApproxBPPrecision
=================

A Lightning precision plugin for fine-tuning with Approx-BP / MS-BP layers. It behaves like
Lightning's own plugin for the same precision string and adds what the memory-saving layers
need to pay off under reduced precision.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable
from weakref import WeakKeyDictionary, WeakSet

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_approxbp.plugins.module_transforms import (
    follow_input_dtype,
    recast_trainable_weights,
    store_frozen_weights,
)

PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")

_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16}
# Strategies that need their own precision type or own the module's dtypes.
_UNSUPPORTED_STRATEGIES = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)


class ApproxBPPrecision(Precision):
    r"""Lightning precision plugin that lets the ApproxBP layers save memory under reduced precision.

    Pass it instead of ``precision=``. For the given precision string it does what Lightning's
    own plugin does (``Precision``, ``MixedPrecision`` or ``HalfPrecision``, held inside and
    called for every hook), plus:

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
      tensor. Under ``"*-true"`` a norm built with an explicit wider ``output_dtype`` is reset
      to follow its input, as its consumer now has half-precision weights.
    - **Loss scaling** under ``"16-mixed"`` is Lightning's ``GradScaler`` logic, unchanged:
      the ApproxBP backward passes propagate ``inf``/``NaN`` so the scaler still skips the step.
    - **Clear errors** for unknown precision strings and for strategies that need their own
      precision type (FSDP, ModelParallel, DeepSpeed, XLA).

    The ApproxBP callback works without this plugin (``Trainer(precision="bf16-mixed")``); the
    plugin adds the frozen-weight saving on top (see ``docs/lightning.md`` for measured numbers).

    Args:
        precision: one of ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"``,
            ``"bf16-true"``.
        device: device type for ``torch.autocast`` and the ``GradScaler`` (``"cuda"``, ``"cpu"``,
            ``"mps"``). Default: the Trainer's root device type, known when training starts.
        store_frozen_weights: store frozen weights in the autocast dtype (mixed precision only).
        recast_trainable_weights: cast trainable ``nn.Linear`` weights again in backward instead of
            saving autocast's copy (mixed precision only).

    Raises:
        ValueError: for a precision string not in the list above.
        MisconfigurationException: when used with FSDP, ModelParallel, DeepSpeed or XLA.

    Example::

        from lightning.pytorch import Trainer
        from lightning_approxbp.callbacks.approxbp import ApproxBP
        from lightning_approxbp.plugins import ApproxBPPrecision

        trainer = Trainer(callbacks=[ApproxBP()], plugins=[ApproxBPPrecision("bf16-mixed")])
    """

    def __init__(
        self,
        precision: str = "bf16-mixed",
        device: str | None = None,
        store_frozen_weights: bool = True,
        recast_trainable_weights: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"ApproxBPPrecision(precision={precision!r}) is not supported. Choose one of: {', '.join(PRECISIONS)}."
            )
        self.precision = precision  # type: ignore[assignment]
        self.store_frozen_weights = store_frozen_weights
        self.recast_trainable_weights = recast_trainable_weights
        self._explicit_device = device
        self._plugin = _lightning_plugin(precision, device or _default_device_type())
        self._stored: WeakKeyDictionary[nn.Parameter, torch.dtype] = WeakKeyDictionary()
        self._recasting: WeakSet[nn.Linear] = WeakSet()

    @property
    def plugin(self) -> Precision:
        """The Lightning plugin this one delegates to (``Precision``, ``MixedPrecision`` or ``HalfPrecision``)."""
        return self._plugin

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The ``GradScaler`` under ``"16-mixed"``, else ``None``."""
        return getattr(self._plugin, "scaler", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype layers compute in: the autocast or cast dtype, ``torch.float32`` for ``"32-true"``."""
        return _DTYPES.get(self.precision.split("-")[0], torch.float32)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        self._check_strategy(module)
        self._bind_device(module)
        module = self._plugin.convert_module(module)
        if self.precision.endswith("-mixed") and self.store_frozen_weights:
            self._store_frozen_weights(module)
        if self.precision.endswith("-mixed") and self.recast_trainable_weights:
            self._recasting.update(recast_trainable_weights(module))
        if self.precision in ("16-true", "bf16-true"):
            follow_input_dtype(module, self.compute_dtype)
        return module

    @override
    def teardown(self) -> None:
        self._restore_frozen_weights()
        for linear in list(self._recasting):
            linear.__dict__.pop("forward", None)
        self._recasting = WeakSet()
        self._plugin.teardown()

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

    def _bind_device(self, module: nn.Module) -> None:
        """Rebuild the delegate for the Trainer's device type unless ``device`` was given."""
        trainer = _attached_trainer(module)
        if self._explicit_device is not None or trainer is None:
            return
        device_type = trainer.strategy.root_device.type
        if getattr(self._plugin, "device", device_type) != device_type:
            self._plugin = _lightning_plugin(self.precision, device_type)

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

    def _restore_frozen_weights(self) -> None:
        for param, dtype in list(self._stored.items()):
            param.data = param.data.to(dtype)
        self._stored.clear()

    # Everything below hands the hook to Lightning's plugin for this precision string.

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        return self._plugin.connect(model, optimizers, lr_schedulers)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return self._plugin.tensor_init_context()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self._plugin.module_init_context()

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with self._plugin.forward_context():
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        return self._plugin.convert_input(data)

    @override
    def convert_output(self, data: Any) -> Any:
        return self._plugin.convert_output(data)

    @override
    def pre_backward(self, tensor: Tensor, module: LightningModule) -> Tensor:  # type: ignore[override]
        return self._plugin.pre_backward(tensor, module)

    @override
    def backward(  # type: ignore[override]
        self, tensor: Tensor, model: LightningModule, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        self._plugin.backward(tensor, model, optimizer, *args, **kwargs)

    @override
    def post_backward(self, tensor: Tensor, module: LightningModule) -> Tensor:  # type: ignore[override]
        return self._plugin.post_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        return self._plugin.optimizer_step(optimizer, model=model, closure=closure, **kwargs)

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        self._plugin.clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    @override
    def main_params(self, optimizer: Optimizer) -> Iterator[nn.Parameter]:
        return iter(self._plugin.main_params(optimizer))

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        self._plugin.unscale_gradients(optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._plugin.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._plugin.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plugin.on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plugin.on_load_checkpoint(checkpoint)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(precision={self.precision!r}, store_frozen_weights={self.store_frozen_weights}, "
            f"recast_trainable_weights={self.recast_trainable_weights})"
        )


def _attached_trainer(module: nn.Module) -> Trainer | None:
    if not isinstance(module, LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # not attached
        return None


def _lightning_plugin(precision: str, device_type: str) -> Precision:
    if precision.endswith("-mixed"):
        return MixedPrecision(precision, device_type)  # type: ignore[arg-type]
    if precision.endswith("-true") and precision != "32-true":
        return HalfPrecision(precision)  # type: ignore[arg-type]
    return Precision()


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
