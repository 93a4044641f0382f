"""The ApproxBP callback in real (tiny) Trainer runs on CPU."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approxbp import ApproxBP, ConversionConfig, convert
from lightning_approxbp.conversion.gated_mlp import FusedGatedMLP
from lightning_approxbp.conversion.norms import ConvertedRMSNorm
from tests.distributed import run_script
from tests.tolerances import (
    CONVERTED_OUTPUT_FP32,
    DDP_RANKS_CHECKSUM_RELATIVE,
    SAME_TRAINING_FP32,
)

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 12


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def _ids(n: int = 4) -> Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))


class LitLM(LightningModule):
    def __init__(self, gradient_checkpointing: bool = False, example: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = self._build()
        if example:
            self.example_input_array = _ids(2)

    def _build(self) -> nn.Module | None:
        model = _llama()
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(_ids()), batch_size=2)


class LitBuiltInConfigureModel(LitLM):
    def _build(self) -> nn.Module | None:
        return None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = _llama()


class LitTiny(LightningModule):
    """Nothing to convert: Linear and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)


def _trainer(callbacks: list, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
    }
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _converted(module: nn.Module) -> bool:
    kinds = {type(m) for m in module.modules()}
    return FusedGatedMLP in kinds and ConvertedRMSNorm in kinds


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_fit_converts_once_in_every_precision(precision: str) -> None:
    callback = ApproxBP()
    model = LitLM()
    _trainer([callback], precision=precision).fit(model)
    assert _converted(model)
    assert callback.report is not None
    assert callback.report.probe == "training_step on all 2 samples of the first train batch"
    assert callback.report.bytes_after < callback.report.bytes_before
    assert torch.isfinite(model.trainer.callback_metrics["train_loss"])
    report = callback.report
    _trainer([callback], precision=precision).fit(model)  # second fit: nothing redone
    assert callback.report is report


def test_example_input_array_and_gradient_checkpointing(caplog: pytest.LogCaptureFixture) -> None:
    callback = ApproxBP()
    model = LitLM(gradient_checkpointing=True, example=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _trainer([callback]).fit(model)
        _trainer([callback]).fit(model)
    assert callback.report.probe == "example_input_array" and _converted(model)
    assert caplog.text.count("ApproxBP conversion (probe: example_input_array)") == 1  # printed once


class _RecordRNG(Callback):
    """Records the global RNG state at fit start (after the conversion)."""

    state: Tensor | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state = torch.random.get_rng_state()


def test_datamodule_batch_is_the_probe_and_rng_is_untouched() -> None:
    class DataModule(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(_ids()), batch_size=2, shuffle=True)

    class LitNoLoader(LitLM):
        train_dataloader = LightningModule.train_dataloader

    states, approxbp = [], ApproxBP()
    for callbacks in ([approxbp], []):
        model, recorder = LitNoLoader(), _RecordRNG()
        torch.manual_seed(7)
        _trainer([*callbacks, recorder], max_steps=1).fit(model, datamodule=DataModule())
        states.append(recorder.state)
    assert torch.equal(states[0], states[1])
    assert approxbp.report.probe == "training_step on all 2 samples of the first train batch"
    callback = ApproxBP()
    callback.setup(_trainer([]), LitNoLoader(), "validate")  # other stages: nothing happens
    assert callback.report is None


def test_layers_built_in_configure_model_are_converted() -> None:
    callback = ApproxBP()
    model = LitBuiltInConfigureModel()
    _trainer([callback]).fit(model)
    assert _converted(model) and callback.report.converted
    assert "configure_model" not in vars(model)  # the temporary wrapper is gone


class LitBuiltInSetup(LightningModule):
    """Builds its layers in ``setup``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp: nn.Module | None = None
        self.seen_in_configure_optimizers: set[type] = set()

    def setup(self, stage: str) -> None:
        if self.mlp is None:
            torch.manual_seed(0)
            self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.mlp(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.seen_in_configure_optimizers = {type(m) for m in self.modules()}
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 8, generator=torch.Generator().manual_seed(2))), batch_size=4)


class LitBuiltInSetupAndConfigureModel(LitBuiltInSetup):
    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.head(self.mlp(batch[0])).pow(2).mean()


def test_layers_built_in_setup_are_converted_once_before_configure_optimizers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_approxbp.callbacks import approxbp as module

    calls: list[nn.Module] = []

    def counting_convert(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(model)
        return convert(model, *args, **kwargs)

    monkeypatch.setattr(module, "convert", counting_convert)
    for cls, built in [
        (LitBuiltInSetup, {"mlp.0", "mlp.1", "mlp.2"}),
        (LitBuiltInSetupAndConfigureModel, {"mlp.0", "mlp.1", "mlp.2", "head.0", "head.1"}),
    ]:
        calls.clear()
        callback, model = ApproxBP(), cls()
        _trainer([callback]).fit(model)
        assert calls == [model]  # once, after the last of the model's own hooks
        assert built <= {row.fqn for row in callback.report.rows if row.action == "converted"}
        converted_types = {type(m) for m in model.modules()}
        assert nn.LayerNorm not in converted_types and nn.GELU not in converted_types
        assert model.seen_in_configure_optimizers == converted_types
        assert not {"setup", "configure_model"} & set(vars(model))  # the temporary wrapper is gone


def test_a_fit_that_fails_before_the_model_hooks_leaves_no_wrapper() -> None:
    class Fail(Callback):
        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            raise RuntimeError("boom")

    callback, model = ApproxBP(), LitBuiltInSetup()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer([callback, Fail()]).fit(model)
    assert "setup" not in vars(model) and callback.report is None
    _trainer([callback]).fit(model)
    assert callback.report.converted and "setup" not in vars(model)


def test_a_setup_set_on_the_instance_is_wrapped_and_put_back() -> None:
    model = LitBuiltInSetup()
    own_setup = model.setup
    model.setup = lambda stage: own_setup(stage)  # e.g. patched by a test or a framework
    patched = vars(model)["setup"]
    callback = ApproxBP()
    _trainer([callback]).fit(model)
    assert vars(model)["setup"] is patched and callback.report.converted


class LitLMBatchSizes(LitLM):
    """Records the batch size of every ``training_step`` call; batches of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.sizes.append(len(batch[0]))
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(_ids(16)), batch_size=8)


def test_the_probe_runs_on_the_first_samples_of_the_train_batch_and_converts_the_same() -> None:
    reports = {}
    for samples in (2, 8):
        callback, model = ApproxBP(probe_samples=samples), LitLMBatchSizes()
        _trainer([callback], max_steps=1).fit(model)
        assert model.sizes == [samples, samples, 8]  # original and converted probe, then the real step
        reports[samples] = callback.report
    assert reports[2].probe == "training_step on 2 of 8 samples of the first train batch"
    assert reports[8].probe == "training_step on all 8 samples of the first train batch"
    decisions = [[(r.fqn, r.action, r.strategy) for r in reports[n].rows] for n in (2, 8)]
    assert decisions[0] == decisions[1] and reports[2].converted
    assert reports[2].bytes_before < reports[8].bytes_before


class _Pair:
    """A batch whose fields differ in leading size, or that needs all of its list field."""

    @staticmethod
    def uneven(samples: list) -> tuple[Tensor, Tensor]:
        return torch.stack([s[0] for s in samples]), torch.zeros(3)

    @staticmethod
    def with_names(samples: list) -> tuple[Tensor, list[str]]:
        return torch.stack([s[0] for s in samples]), [f"s{i}" for i in range(len(samples))]


@pytest.mark.parametrize(
    ("collate", "probe"),
    [
        (_Pair.uneven, "training_step on the first train batch (whole: its tensors have no common leading size)"),
        (_Pair.with_names, "training_step on all 8 samples of the first train batch (it failed on 2)"),
    ],
)
def test_a_batch_that_cannot_be_sliced_is_probed_whole(collate: Callable, probe: str) -> None:
    class LitWholeBatch(LitLMBatchSizes):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            ids, extra = batch
            assert len(extra) in (3, len(ids))  # a step that needs every name of the batch
            return super().training_step((ids,), batch_idx)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(_ids(8)), batch_size=8, collate_fn=collate)

    callback, model = ApproxBP(), LitWholeBatch()
    _trainer([callback], max_steps=1).fit(model)
    assert callback.report.probe == probe and _converted(model)
    assert model.sizes[-3:] == [8, 8, 8]


@pytest.mark.parametrize("samples", [0, -1, 1.5, True])
def test_probe_samples_must_be_a_positive_int(samples: Any) -> None:
    with pytest.raises(ValueError, match="`probe_samples` must be a positive int"):
        ApproxBP(probe_samples=samples)


def test_training_step_that_needs_the_optimizer_falls_back_to_no_probe() -> None:
    class LitNeedsOptimizer(LitLM):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            return super().training_step(batch, batch_idx)

    callback = ApproxBP()
    model = LitNeedsOptimizer()
    with pytest.warns(UserWarning, match="could not run on the probe batch"):
        _trainer([callback]).fit(model)
    assert callback.report.probe == "none" and "keep" in callback.report.row("model.model.norm").strategy


def test_nothing_to_convert_warns() -> None:
    callback = ApproxBP()
    with pytest.warns(UserWarning, match="nothing to convert"):
        _trainer([callback]).fit(LitTiny())
    assert not callback.report.changed


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"activations": False, "norms": False, "gated_mlp": False, "dropout": False}, "enable at least one"),
        ({"table": "paper", "bits": 1}, "pass bits=2"),
        ({"affine": "keep", "norms": False}, "norms=False"),
    ],
)
def test_conflicting_options_fail_at_construction(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApproxBP(**options)


def test_a_keyword_given_with_a_config_is_an_error_that_names_it() -> None:
    config = ConversionConfig(verify=False)
    # verify=True is the default value, and still a conflict: the config says otherwise
    with pytest.raises(ValueError, match=r"or the options \(fused_loss, verify\), not both"):
        ApproxBP(config=config, verify=True, fused_loss=False)
    assert ApproxBP(config=config).config is config
    assert ApproxBP(fused_loss=False, bits=4).config == ConversionConfig(fused_loss=False, bits=4)
    assert ApproxBP().config == ConversionConfig()


def test_checkpoint_loads_strictly_into_the_unconverted_module_and_resume_continues(tmp_path: Path) -> None:
    # one epoch is 2 steps; the epoch-end checkpoint resumes at a clean epoch boundary
    epoch = {"max_steps": -1, "enable_checkpointing": True, "default_root_dir": tmp_path}
    trained = LitLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([ApproxBP(), checkpoint], max_epochs=1, **epoch).fit(trained)
    path = tmp_path / "last.ckpt"
    assert set(torch.load(path, weights_only=True)["state_dict"]) == set(LitLM().state_dict())

    plain = LitLM.load_from_checkpoint(path, strict=True)
    assert not _converted(plain)
    ids = _ids(2)
    trained.eval()
    plain.eval()
    torch.testing.assert_close(plain(ids), trained(ids), **CONVERTED_OUTPUT_FP32)

    resumed, straight = LitLM(), LitLM()
    _trainer([ApproxBP()], max_epochs=2, **epoch).fit(resumed, ckpt_path=path)
    _trainer([ApproxBP()], max_epochs=2, **epoch).fit(straight)
    assert _converted(resumed)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **SAME_TRAINING_FP32, msg=name)


_DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
from tests.callbacks.test_approxbp import LitLM, _trainer
from tests.distributed import end_distributed_run
from lightning_approxbp import ApproxBP, convert

callback = ApproxBP()
model = LitLM()
trainer = _trainer([callback], strategy="ddp", devices=2, max_steps=2)
trainer.fit(model)
checksum = sum(p.detach().double().sum().item() for p in model.parameters())
out = {{"rank": trainer.global_rank, "checksum": checksum, "converted": len(callback.report.converted)}}
with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
    json.dump(out, f)
end_distributed_run()
"""


def test_ddp_two_processes_stay_in_sync(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(root=root, out=str(tmp_path))))
    run_script(script)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["converted"] == ranks[1]["converted"] > 0
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=DDP_RANKS_CHECKSUM_RELATIVE)


@pytest.mark.gpu
def test_fsdp_on_one_gpu() -> None:
    callback = ApproxBP()
    model = LitLM()
    trainer = _trainer([callback], accelerator="cuda", strategy="fsdp", precision="bf16-mixed")
    trainer.fit(model)
    assert _converted(model) and callback.report.converted
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
