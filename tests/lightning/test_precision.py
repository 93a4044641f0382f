"""ApproxBPPrecision: Lightning's plugin class for each precision (type checks, aliases,
checkpoints, ThroughputMonitor), plus frozen weights in the autocast dtype (bit-identical
forward, fewer saved bytes), norm/linear sharing, loss scaling."""

from __future__ import annotations

import copy
import logging
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    FSDPPrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_approxbp.nn import MSLayerNorm, StepActivation
from lightning_approxbp.plugins import (
    ApproxBPFSDPPrecision,
    ApproxBPPrecision,
    store_frozen_weights,
)
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import ROUNDED_START_GAP_FACTOR, SAME_TRAINING_FP32

HALF = {"bf16": torch.bfloat16, "16": torch.float16}
LIGHTNING_FAMILIES = (MixedPrecision, HalfPrecision, DoublePrecision)


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "device", "expected"),
    [
        (True, True, False, None, "bf16-mixed"),  # Ampere or later
        (True, False, True, None, "16-mixed"),  # an older GPU; the CPU does not decide
        (True, True, False, "cpu", "32-true"),  # the device asked for decides, not the one present
        (False, False, True, None, "bf16-mixed"),  # a CPU with AVX512-BF16/AMX
        (False, False, False, None, "32-true"),  # AVX2 only
        (False, True, True, "mps", "32-true"),
    ],
    ids=["cuda-bf16", "cuda-fp16-only", "cpu-asked-on-a-gpu-machine", "cpu-bf16", "cpu-avx2", "mps"],
)
def test_auto_picks_the_precision_the_hardware_computes_natively(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    cuda: bool, cuda_bf16: bool, cpu_bf16: bool, device: str | None, expected: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16 and not including_emulation)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        plugin = ApproxBPPrecision("auto", device=device)
    assert plugin.precision == expected and type(plugin) is type(ApproxBPPrecision(expected, device=device))
    said = [r.getMessage() for r in caplog.records if "ApproxBPPrecision('auto')" in r.getMessage()]
    assert len(said) == 1 and f"chose {expected!r}: " in said[0]
    assert pickle.loads(pickle.dumps(plugin)).precision == expected  # copies keep the choice, not 'auto'


def test_auto_in_a_lightning_cli_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_approxbp import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "auto.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  logger: false\n"
        "  plugins: [{class_path: ApproxBPPrecision, init_args: {precision: auto}}]\n"
        "model: {class_path: lightning.pytorch.demos.boring_classes.BoringModel}\n"
    )
    parsed = cli.cli(["--config", str(config)], run=False)
    assert isinstance(parsed.trainer.precision_plugin, ApproxBPPrecision)
    assert parsed.trainer.precision == "32-true"


def test_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="use one of '32-true', '16-mixed', 'bf16-mixed', '16-true', 'bf16-true'"):
        ApproxBPPrecision("8-mixed")


def test_transformer_engine_points_to_lightnings_plugin() -> None:
    with pytest.raises(ValueError, match=r"TransformerEnginePrecision.*`Trainer\(precision='transformer-engine'\)`"):
        ApproxBPPrecision("transformer-engine")


@pytest.mark.parametrize(
    ("precision", "delegate"),
    [
        ("32-true", Precision),
        ("bf16-mixed", MixedPrecision),
        ("16-mixed", MixedPrecision),
        ("bf16-true", HalfPrecision),
        ("16-true", HalfPrecision),
        ("64-true", DoublePrecision),
    ],
)
def test_is_lightnings_plugin_for_its_precision(precision: str, delegate: type) -> None:
    plugin = ApproxBPPrecision(precision, device="cpu")
    assert isinstance(plugin, delegate) and isinstance(plugin, ApproxBPPrecision)
    assert [isinstance(plugin, family) for family in LIGHTNING_FAMILIES] == [
        family is delegate for family in LIGHTNING_FAMILIES
    ]
    assert plugin.precision == precision and plugin.plugin is plugin
    assert (plugin.scaler is not None) == (precision == "16-mixed")
    assert type(copy.deepcopy(plugin)) is type(plugin)  # copies keep the family class


def test_a_family_class_refuses_another_familys_precision() -> None:
    half_class = type(ApproxBPPrecision("bf16-true"))
    with pytest.raises(ValueError, match=r"Use `ApproxBPPrecision\('bf16-mixed'\)`"):
        half_class("bf16-mixed")


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [(16, "16-mixed"), ("16", "16-mixed"), ("bf16", "bf16-mixed"), (32, "32-true"), ("32", "32-true"),
     (64, "64-true"), ("64", "64-true")],
    ids=["16", "'16'", "'bf16'", "32", "'32'", "64", "'64'"],
)
@pytest.mark.filterwarnings("ignore:.*supported for historical reasons")  # Lightning's, as Trainer(precision=16)
def test_accepts_lightnings_aliases(alias: int | str, canonical: str) -> None:
    plugin = ApproxBPPrecision(alias, device="cpu")  # type: ignore[arg-type]
    assert plugin.precision == canonical
    assert type(plugin) is type(ApproxBPPrecision(canonical, device="cpu"))


@pytest.mark.parametrize(
    ("precision", "lightning_plugin"),
    [
        ("16-mixed", lambda: MixedPrecision("16-mixed", "cpu")),
        ("bf16-mixed", lambda: MixedPrecision("bf16-mixed", "cpu")),
        ("16-true", lambda: HalfPrecision("16-true")),
        ("bf16-true", lambda: HalfPrecision("bf16-true")),
        ("64-true", DoublePrecision),
    ],
    ids=["16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"],
)
def test_throughput_monitor_sees_the_same_compute_dtype(precision: str, lightning_plugin: Callable) -> None:
    # What ThroughputMonitor.setup passes to get_available_flops (FLOPs and MFU depend on it).
    plugin = ApproxBPPrecision(precision, device="cpu")
    assert _plugin_to_compute_dtype(plugin) == _plugin_to_compute_dtype(lightning_plugin()) == plugin.compute_dtype


class _FrozenBackbone(nn.Module):
    """Linear, Conv1d, Conv2d and transformers Conv1D layers, frozen, under a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.gpt_proj = Conv1D(32, 8)
        self.linear = nn.Linear(32, 32)
        self.act = StepActivation("gelu")
        self.norm = MSLayerNorm(32, elementwise_affine=False)
        self.head = nn.Linear(32, 4)
        for module in (self.conv2d, self.conv1d, self.gpt_proj, self.linear):
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2d(x).flatten(2)  # (B, 8, H*W)
        h = self.conv1d(h).transpose(1, 2).contiguous()  # (B, H*W, 8)
        h = self.act(self.linear(self.gpt_proj(h)))
        return self.head(self.norm(h))


@pytest.mark.parametrize("half", ["bf16", "16"])
def test_frozen_weights_forward_is_bit_identical_and_saves_less(half: str) -> None:
    precision = f"{half}-mixed"
    model = _FrozenBackbone()
    reference = copy.deepcopy(model)
    plugin = ApproxBPPrecision(precision, device="cpu")
    plugin.convert_module(model)
    lightning_plugin = MixedPrecision(precision, "cpu")  # type: ignore[arg-type]
    x = torch.randn(4, 3, 6, 6, requires_grad=True)  # as when adapters upstream train

    results = []
    for module, amp in ((reference, lightning_plugin), (model, plugin)):
        with SavedTensorCounter(exclude=module.parameters()) as counter, amp.forward_context():
            out = module(x)
        out.float().square().sum().backward()
        results.append((out, [p.grad for p in module.head.parameters()], counter.stats))
    (ref_out, ref_grads, ref_stats), (out, grads, stats) = results

    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    frozen = [model.conv2d, model.conv1d, model.gpt_proj, model.linear]
    assert all(p.dtype == HALF[half] for m in frozen for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    # Without the plugin, autocast makes a half-precision copy of each weight and saves it.
    weight_copies = sum(m.weight.numel() * 2 for m in (*frozen, model.head))
    assert ref_stats.activation_bytes - stats.activation_bytes == weight_copies


def test_weight_tied_to_an_embedding_is_left_alone() -> None:
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head).requires_grad_(False)
    assert store_frozen_weights(model, torch.bfloat16) == {}
    assert embedding.weight.dtype == torch.float32


def test_trainable_and_non_autocast_layers_keep_their_dtype() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4).requires_grad_(False))
    assert store_frozen_weights(model, torch.bfloat16) == {}


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_ms_norm_and_next_linear_save_one_half_precision_copy(precision: str) -> None:
    model = nn.Sequential(MSLayerNorm(64, elementwise_affine=False), nn.Linear(64, 64))
    plugin = ApproxBPPrecision(precision, device="cpu")
    plugin.convert_module(model)
    x = plugin.convert_input(torch.randn(8, 64, requires_grad=True))
    with SavedTensorCounter(exclude=model.parameters()) as counter, plugin.forward_context():
        model(x)
    rows = 8
    assert counter.stats.bytes_by_dtype == {"bfloat16": rows * 64 * 2, "float32": rows * 4}


@pytest.mark.parametrize("half", ["bf16", "16"])
@pytest.mark.parametrize("shape", [(8, 32), (2, 5, 32)])
def test_trainable_linears_recast_in_backward_bit_identical(half: str, shape: tuple[int, ...]) -> None:
    _check_recast_bit_identical(f"{half}-mixed", shape, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("half", ["bf16", "16"])
def test_trainable_linears_recast_in_backward_bit_identical_on_cuda(half: str) -> None:
    """cuBLAS picks kernels by operand order and layout: the recast GEMMs must be autograd's."""
    _check_recast_bit_identical(f"{half}-mixed", (4, 77, 32), "cuda")


def _check_recast_bit_identical(precision: str, shape: tuple[int, ...], device: str) -> None:
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16, bias=False)).to(device)
    reference = copy.deepcopy(model)
    plugin = ApproxBPPrecision(precision, device=device)
    plugin.convert_module(model)
    x = torch.randn(*shape, device=device)
    results = []
    for module, amp in ((reference, MixedPrecision(precision, device)), (model, plugin)):  # type: ignore[arg-type]
        inputs = x.clone().requires_grad_(True)
        with SavedTensorCounter(exclude=module.parameters()) as counter, amp.forward_context():
            out = module(inputs)
        out.float().sin().sum().backward()
        results.append((out, inputs.grad, [p.grad for p in module.parameters()], counter.stats.activation_bytes))
    (ref_out, ref_dx, ref_grads, ref_saved), (out, dx, grads, saved) = results
    assert torch.equal(out, ref_out) and torch.equal(dx, ref_dx)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert ref_saved - saved == (32 * 48 + 48 * 16) * 2  # autocast's two weight copies
    plugin.teardown()
    assert "forward" not in model[0].__dict__


def test_true_precision_resets_a_wider_norm_output_dtype() -> None:
    model = nn.Sequential(MSLayerNorm(16, output_dtype=torch.float32), nn.Linear(16, 16))
    plugin = ApproxBPPrecision("bf16-true")
    plugin.convert_module(model)
    assert model[0].output_dtype is None
    with plugin.forward_context():
        assert model(plugin.convert_input(torch.randn(2, 16))).dtype == torch.bfloat16


def test_64_true_resets_a_narrower_norm_output_dtype() -> None:
    model = nn.Sequential(MSLayerNorm(16, output_dtype=torch.float32), nn.Linear(16, 16))
    plugin = ApproxBPPrecision("64-true")
    plugin.convert_module(model)
    assert model[0].output_dtype is None
    with plugin.forward_context():
        assert model(plugin.convert_input(torch.randn(2, 16))).dtype == torch.float64


class _Overflowing(LightningModule):
    """fp16 loss so large that the scaled gradients overflow; passes through ApproxBP ops."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), StepActivation("gelu"), MSLayerNorm(16), nn.Linear(16, 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).float().sum() * 1e4

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(8, 16), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_one_step(model: LightningModule, plugin: Precision, ckpt_path: Path | None = None) -> Trainer:
    trainer = Trainer(
        accelerator="cpu", max_steps=1, plugins=[plugin], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def test_16_mixed_skips_the_step_on_inf_gradients() -> None:
    model = _Overflowing()
    before = copy.deepcopy(model.state_dict())
    plugin = ApproxBPPrecision("16-mixed")
    trainer = _fit_one_step(model, plugin)
    assert trainer.precision == "16-mixed"
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 2.0**15  # halved after the skipped step
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    ("save_with", "resume_with"),
    [(MixedPrecision, ApproxBPPrecision), (ApproxBPPrecision, MixedPrecision)],
    ids=["lightning-to-approxbp", "approxbp-to-lightning"],
)
def test_16_mixed_checkpoints_carry_the_scaler_between_lightning_and_approxbp(
    save_with: Callable[..., Precision], resume_with: Callable[..., Precision], tmp_path: Path
) -> None:
    path = tmp_path / "step1.ckpt"
    _fit_one_step(_Overflowing(), save_with("16-mixed", "cpu")).save_checkpoint(path)
    assert torch.load(path, weights_only=False)["MixedPrecision"]["scale"] == 2.0**15  # halved by the overflow
    plugin = resume_with("16-mixed", "cpu")
    _fit_one_step(_Overflowing(), plugin, ckpt_path=path)  # already at max_steps: restores, trains nothing
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 2.0**15  # a fresh scaler has 2**16


def test_loads_the_scaler_saved_by_the_earlier_wrapper_plugin() -> None:
    plugin = ApproxBPPrecision("16-mixed", device="cpu")
    plugin.on_load_checkpoint({"ApproxBPPrecision": torch.amp.GradScaler("cpu", init_scale=2.0**10).state_dict()})
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 2.0**10


class _FrozenFirstLayer(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.head(self.frozen(batch))
        assert self.frozen.weight.dtype == torch.bfloat16
        return out.float().square().mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(8, 16), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_trainer_fit_stores_frozen_weights_and_restores_dtype_after() -> None:
    model = _FrozenFirstLayer()
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, plugins=[ApproxBPPrecision("bf16-mixed")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    assert trainer.precision == "bf16-mixed"
    assert model.frozen.weight.dtype == torch.float32  # teardown restored it (values bf16-rounded)
    assert torch.equal(model.frozen.weight, model.frozen.weight.bfloat16().float())


def test_deepspeed_fails_with_what_to_use_instead() -> None:
    model = _FrozenFirstLayer()
    model.trainer = mock.Mock(strategy=mock.Mock(spec=DeepSpeedStrategy))  # deepspeed itself is not installed
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy.*ApproxBPFSDPPrecision.*`Trainer\(precision='bf16-mixed'\)`"):
        ApproxBPPrecision("bf16-mixed").convert_module(model)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "bf16", "auto"])
def test_the_fsdp_plugin_is_lightnings_fsdp_precision(precision: str) -> None:
    plugin = ApproxBPFSDPPrecision(precision)
    assert isinstance(plugin, FSDPPrecision) and isinstance(plugin, ApproxBPPrecision)
    assert FSDPStrategy(precision_plugin=plugin).precision_plugin is plugin  # FSDPStrategy takes it
    assert type(pickle.loads(pickle.dumps(plugin))) is ApproxBPFSDPPrecision
    with pytest.raises(TypeError, match="can only work with the `FSDPPrecision` plugin"):
        FSDPStrategy(precision_plugin=ApproxBPPrecision(plugin.precision, device="cpu"))


def test_the_fsdp_plugin_leaves_weights_to_fsdp_and_resets_norms_under_true_precision() -> None:
    def model() -> nn.Sequential:
        return nn.Sequential(MSLayerNorm(16, output_dtype=torch.float32), nn.Linear(16, 16).requires_grad_(False))

    mixed, true = model(), model()
    plugin = ApproxBPFSDPPrecision("bf16-mixed")
    plugin.convert_module(mixed)
    assert plugin.mixed_precision_config.param_dtype == torch.bfloat16  # FSDP gathers the weights in bf16 itself
    assert mixed[1].weight.dtype == torch.float32 and "forward" not in vars(mixed[1])  # nothing stored or recast
    ApproxBPFSDPPrecision("bf16-true").convert_module(true)
    assert true[1].weight.dtype == torch.bfloat16 and true[0].output_dtype is None
    with pytest.raises(ValueError, match="FSDP supports 32-true, 16-mixed"):
        ApproxBPFSDPPrecision("64-true")
    checkpoint: dict = {}
    ApproxBPFSDPPrecision("16-mixed").on_save_checkpoint(checkpoint)
    assert set(checkpoint) <= {"FSDPPrecision"}  # saved under Lightning's class name, if at all


@pytest.mark.parametrize(
    ("plugin", "strategy", "match"),
    [
        (lambda: ApproxBPPrecision("bf16-mixed", device="cpu"), FSDPStrategy, r"use `ApproxBPFSDPPrecision\('bf16-mixed'\)`"),
        (lambda: ApproxBPFSDPPrecision("bf16-mixed"), DDPStrategy, r"`ApproxBPPrecision\('bf16-mixed'\)` with every other"),
    ],
    ids=["mixed-under-fsdp", "fsdp-under-ddp"],
)
def test_a_plugin_under_the_other_kind_of_strategy_says_which_to_use(
    plugin: Callable[[], Precision], strategy: type, match: str
) -> None:
    model = _FrozenFirstLayer()
    model.trainer = mock.Mock(strategy=mock.Mock(spec=strategy))
    with pytest.raises(MisconfigurationException, match=match):
        plugin().convert_module(model)


@pytest.mark.gpu
def test_fsdp1_run_with_the_callback_and_the_fsdp_plugin() -> None:
    from lightning_approxbp import ApproxBP

    model, callback = _LitBackboneAndHead(), ApproxBP()
    trainer = Trainer(
        accelerator="cuda", devices=1, strategy="fsdp", plugins=[ApproxBPFSDPPrecision("bf16-mixed")],
        callbacks=[callback], max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model)
    assert callback.report is not None and callback.report.converted  # the GELU
    assert isinstance(trainer.precision_plugin, ApproxBPFSDPPrecision)
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(model.parameters(), before))


def test_merged_linears_of_the_approxbp_conversion_are_stored_too() -> None:
    from lightning_approxbp.conversion import convert
    from lightning_approxbp.conversion.merged import AffineMergedLinear

    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16).requires_grad_(False), nn.Linear(16, 2))
    x = torch.randn(4, 16, requires_grad=True)
    convert(model, x)
    assert type(model[1]) is AffineMergedLinear
    reference = copy.deepcopy(model)
    plugin = ApproxBPPrecision("bf16-mixed", device="cpu")
    plugin.convert_module(model)
    assert model[1].weight.dtype == torch.bfloat16
    with plugin.forward_context():
        assert torch.equal(model(x), reference(x))


def test_a_mixed_plugin_that_changed_a_module_pickles_for_ddp_spawn():
    plugin = ApproxBPPrecision("bf16-mixed", device="cpu")
    plugin.convert_module(torch.nn.Sequential(torch.nn.Linear(4, 4).requires_grad_(False), torch.nn.Linear(4, 4)))
    copy = pickle.loads(pickle.dumps(plugin))
    assert isinstance(copy, ApproxBPPrecision) and copy.precision == "bf16-mixed"
    assert len(copy._stored) == 0 and len(copy._recasting) == 0  # the copy tracks its own process's modules


class _LitBackboneAndHead(LightningModule):
    """A backbone that ``BackboneFinetuning`` keeps frozen for the first epoch, under a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(3)
        data = torch.utils.data.TensorDataset(torch.randn(16, 16, generator=g), torch.randn(16, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


class _RecordBackbone(Callback):
    """Per optimizer step: the epoch, the dtypes of the backbone's parameters and gradients, and
    whether its linears run the plugin's recast."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, set[torch.dtype], set[torch.dtype], bool]] = []
        self.at_unfreeze: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: object) -> None:
        params = list(pl_module.backbone.parameters())
        grads = {p.grad.dtype for p in params if p.grad is not None}
        recast = all("forward" in vars(m) for m in pl_module.backbone.modules() if isinstance(m, nn.Linear))
        self.steps.append((trainer.current_epoch, {p.dtype for p in params}, grads, recast))
        if grads and not self.at_unfreeze:
            self.at_unfreeze = {n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()}


def _finetune(model: LightningModule, plugin: Precision, *callbacks: Callback) -> Trainer:
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    trainer = Trainer(
        accelerator="cpu", max_epochs=3, plugins=[plugin], callbacks=[finetuning, *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    return trainer


def test_a_backbone_unfrozen_during_fit_trains_with_fp32_master_weights() -> None:
    model, recorder = _LitBackboneAndHead(), _RecordBackbone()
    trainer = _finetune(model, ApproxBPPrecision("bf16-mixed"), recorder)

    frozen_steps = [step[1:] for step in recorder.steps if step[0] == 0]
    assert frozen_steps == [({torch.bfloat16}, set(), False)] * 4  # stored in bf16 while frozen
    # unfrozen: fp32 master weights and gradients, and the linears cast them again in backward
    assert [step[1:] for step in recorder.steps if step[0] > 0] == [({torch.float32}, {torch.float32}, True)] * 8
    backbone = dict(model.backbone.named_parameters())
    assert all(not torch.equal(backbone[name], value) for name, value in recorder.at_unfreeze.items())  # it trained
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2  # BackboneFinetuning added the backbone's group
    states = [optimizer.state[p] for p in backbone.values()]
    assert {s[key].dtype for s in states for key in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    assert not any("forward" in vars(m) for m in model.modules())  # teardown removed the recast


def test_a_backbone_unfrozen_during_fit_trains_as_under_lightnings_mixed_precision() -> None:
    approxbp = _LitBackboneAndHead()
    _finetune(approxbp, ApproxBPPrecision("bf16-mixed"))

    # The plugin's only numerical change: frozen weights are stored, so their fp32 values become
    # the bf16-rounded ones autocast computes with anyway. From weights that are bf16 values
    # already, Lightning's MixedPrecision gives the same training (up to fp32 rounding).
    rounded = _LitBackboneAndHead()
    with torch.no_grad():
        for param in rounded.backbone.parameters():
            param.copy_(param.bfloat16().float())
    _finetune(rounded, MixedPrecision("bf16-mixed", "cpu"))
    for (name, actual), expected in zip(approxbp.named_parameters(), rounded.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, **SAME_TRAINING_FP32, msg=name)

    # From the original fp32 weights, the backbone starts the unfrozen epochs up to half a bf16
    # unit (2**-9 relative, here at most 4.9e-4) away. Two epochs of AdamW keep the gap at that
    # scale (measured: 1.1e-3 at most, while training moved the weights by up to 6e-2).
    original = _LitBackboneAndHead()
    rounding = max((p - p.bfloat16().float()).abs().max().item() for p in original.backbone.parameters())
    _finetune(original, MixedPrecision("bf16-mixed", "cpu"))
    for (name, actual), expected in zip(approxbp.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=ROUNDED_START_GAP_FACTOR * rounding, msg=name)
