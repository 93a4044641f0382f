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
from types import MethodType
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
from torch.nn import functional as F
from torch.optim import Optimizer
from typing_extensions import override

from lightning_approxbp.conversion.merged import MERGED_TYPES
from lightning_approxbp.nn import MSLayerNorm, MSRMSNorm

PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")

_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16}
# Modules whose forward rounds the weight to the autocast dtype at every call: one autocast-listed
# op (linear, addmm, convNd), or the ApproxBP merged linears (which cast to the autocast dtype
# themselves). Exact types only: a subclass may use its weight differently.
_AUTOCAST_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *MERGED_TYPES)
_AUTOCAST_MODULE_NAMES = frozenset({"transformers.pytorch_utils.Conv1D"})
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
            _follow_input_dtype(module, self.compute_dtype)
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


def store_frozen_weights(module: nn.Module, dtype: torch.dtype) -> dict[nn.Parameter, torch.dtype]:
    """Store the frozen weights of autocast-cast layers in ``dtype``, in place.

    A parameter is converted only when it does not require grad, is floating point and wider
    than ``dtype``, and every module that holds it is an exact ``nn.Linear``/``nn.ConvNd``,
    transformers ``Conv1D`` or ApproxBP merged linear (a weight tied to an embedding is left
    alone). Parameter objects are
    kept, so references (optimizers, tied modules) stay valid.

    Returns:
        The converted parameters and their original dtypes.

    Example::

        >>> layer = torch.nn.Linear(4, 4).requires_grad_(False)
        >>> converted = store_frozen_weights(layer, torch.bfloat16)
        >>> layer.weight.dtype, len(converted)
        (torch.bfloat16, 2)
    """
    owners: dict[nn.Parameter, list[nn.Module]] = {}
    for submodule in module.modules():
        for param in submodule.parameters(recurse=False):
            owners.setdefault(param, []).append(submodule)
    converted: dict[nn.Parameter, torch.dtype] = {}
    for param, holders in owners.items():
        if param.requires_grad or not param.is_floating_point():
            continue
        if torch.finfo(param.dtype).bits <= torch.finfo(dtype).bits:
            continue
        if all(_is_autocast_cast(holder) for holder in holders):
            converted[param] = param.dtype
            param.data = param.data.to(dtype)
    return converted


def recast_trainable_weights(module: nn.Module) -> list[nn.Linear]:
    """Make exact ``nn.Linear`` layers with a trainable weight cast it again in backward under autocast.

    The layer's ``forward`` is replaced on the instance (class, parameters and state dict are
    unchanged; ``del layer.forward`` undoes it). Outside autocast, or without grad, the layer
    runs ``F.linear`` as before.

    Returns:
        The layers changed by this call (already changed layers are skipped).

    Example::

        >>> layer = torch.nn.Linear(4, 4)
        >>> len(recast_trainable_weights(layer))
        1
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     layer(torch.randn(2, 4)).dtype
        torch.bfloat16
    """
    changed = []
    for submodule in module.modules():
        if type(submodule) is nn.Linear and submodule.weight.requires_grad and "forward" not in submodule.__dict__:
            submodule.forward = MethodType(_linear_recasting_in_backward, submodule)
            changed.append(submodule)
    return changed


def _linear_recasting_in_backward(self: nn.Linear, x: Tensor) -> Tensor:
    device_type = x.device.type
    if not (torch.is_autocast_enabled(device_type) and torch.is_grad_enabled() and self.weight.requires_grad):
        return F.linear(x, self.weight, self.bias)
    return _RecastLinearFunction.apply(x, self.weight, self.bias, torch.get_autocast_dtype(device_type))


class _RecastLinearFunction(torch.autograd.Function):
    """Autocast's ``linear`` that saves the fp32 weight (a reference) instead of its cast copy.

    Saves the input in the autocast dtype (the tensor autocast's ``linear`` saves too) and the
    weight; recomputes the weight's cast in backward. The matmuls are those autograd runs for
    ``addmm``, so results are bit-identical.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        x_c = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x_c, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_c, weight = ctx.saved_tensors
        x_dtype, bias_dtype = ctx.dtypes
        grad = grad_output.reshape(-1, grad_output.shape[-1]).to(x_c.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(weight.to(x_c.dtype)).view(*x_c.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = x_c.reshape(-1, x_c.shape[-1]).t().mm(grad).t().to(weight.dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None


def _is_autocast_cast(module: nn.Module) -> bool:
    cls = type(module)
    return cls in _AUTOCAST_MODULE_TYPES or f"{cls.__module__}.{cls.__qualname__}" in _AUTOCAST_MODULE_NAMES


def _follow_input_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Under ``*-true``, make memory-sharing norms with a wider explicit ``output_dtype`` emit their input's dtype."""
    for submodule in module.modules():
        if isinstance(submodule, (MSLayerNorm, MSRMSNorm)) and submodule.output_dtype not in (None, dtype):
            submodule.output_dtype = None


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
