"""ApproxBP + ApproxBPPrecision under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), two
CPU processes over gloo: the same training as under DDP."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_approxbp import ApproxBP, convert
from lightning_approxbp.conversion.merged import AffineMergedLinear
from lightning_approxbp.plugins import ApproxBPPrecision
from tests.distributed import end_distributed_run, run_script
from tests.tolerances import SHARDED_TRAINING_FP32

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 16


def _block() -> nn.Module:
    """A pre-LN MLP: the norm's affine merges into the linear, GELU becomes a step activation."""
    return nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))


class LitBlocks(LightningModule):
    """Two blocks and a head, built in ``__init__``; ``configure_model`` shards them under ModelParallelStrategy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(_block(), _block(), nn.Linear(WIDTH, 1))
        self.losses: list[Tensor] = []

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = self.device_mesh["data_parallel"]
            for block in self.net[:2]:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def on_train_start(self) -> None:
        self.losses.clear()  # the conversion's probe ran training_step too

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.detach())  # no .item(): the probe of a sharded model runs on shapes only
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(32, WIDTH, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)


class LitBuiltInConfigureModel(LitBlocks):
    """Builds and shards in ``configure_model``, as FSDP2 examples do; ``convert_first`` converts in between."""

    def __init__(self, convert_first: bool = False) -> None:
        super().__init__()
        del self.net
        self.convert_first = convert_first

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = nn.Sequential(_block(), _block(), nn.Linear(WIDTH, 1))
            if self.convert_first:
                convert(self.net, torch.randn(2, WIDTH))
        super().configure_model()


def fit(strategy: str, out: str) -> None:
    """One two-process run (launched by Lightning); every rank saves its losses, rank 0 the full parameters."""
    model, callback = LitBlocks(), ApproxBP()
    trainer = Trainer(
        accelerator="cpu", devices=2, max_steps=3, plugins=[ApproxBPPrecision("bf16-mixed")], callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    params = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    result = {"losses": [loss.item() for loss in model.losses], "converted": len(callback.report.converted), "sharded": sharded}
    torch.save(result, os.path.join(out, f"{strategy}_rank{trainer.global_rank}.pt"))
    if trainer.global_rank == 0:
        torch.save({n: p.detach().clone() for n, p in params.items()}, os.path.join(out, f"{strategy}_params.pt"))
    end_distributed_run()


def _run(strategy: str, out: Path) -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.lightning.test_fsdp2 import fit; fit({strategy!r}, {str(out)!r})"
    script = out / f"{strategy}.py"  # Lightning's launcher starts rank 1 by running this file again
    script.write_text(code)
    run_script(script)


def test_fsdp2_trains_as_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    for strategy in ("ddp", "fsdp2"):
        _run(strategy, tmp_path)
    for rank in (0, 1):
        ddp, fsdp2 = (torch.load(tmp_path / f"{s}_rank{rank}.pt") for s in ("ddp", "fsdp2"))
        assert fsdp2["sharded"] and not ddp["sharded"]
        assert fsdp2["converted"] == ddp["converted"] == 6  # 2 norms, their 2 merged linears, 2 activations
        assert len(fsdp2["losses"]) == 3
        torch.testing.assert_close(fsdp2["losses"], ddp["losses"], **SHARDED_TRAINING_FP32)
    ddp_params, fsdp2_params = (torch.load(tmp_path / f"{s}_params.pt") for s in ("ddp", "fsdp2"))
    assert list(fsdp2_params) == list(ddp_params)
    for name, value in fsdp2_params.items():
        torch.testing.assert_close(value, ddp_params[name], **SHARDED_TRAINING_FP32, msg=name)


@pytest.fixture
def one_process_group() -> Any:
    """Lets a one-device ModelParallelStrategy run in this process, and undoes what it sets up."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def _fit_one_device(model: LightningModule, callback: ApproxBP) -> None:
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=2, plugins=[ApproxBPPrecision("bf16-mixed")], callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)


@pytest.mark.usefixtures("one_process_group")
def test_layers_built_in_init_are_converted_before_configure_model_shards_them() -> None:
    model, callback = LitBlocks(), ApproxBP()
    _fit_one_device(model, callback)
    assert len(callback.report.converted) == 6
    assert all(isinstance(block[1], AffineMergedLinear) for block in model.net[:2])  # replaced before fully_shard
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert len(model.losses) == 2 and bool(torch.stack(model.losses).isfinite().all())


@pytest.mark.usefixtures("one_process_group")
def test_layers_built_and_sharded_in_configure_model_are_converted() -> None:
    model, callback = LitBuiltInConfigureModel(), ApproxBP()
    _fit_one_device(model, callback)
    assert len(callback.report.converted) == 6
    assert any("after fully_shard" in note for note in callback.report.notes)
    assert all(isinstance(block[1], AffineMergedLinear) for block in model.net[:2])
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert len(model.losses) == 2 and bool(torch.stack(model.losses).isfinite().all())


@pytest.mark.usefixtures("one_process_group")
def test_a_model_converted_in_configure_model_before_fully_shard_is_reported_as_the_users() -> None:
    model, callback = LitBuiltInConfigureModel(convert_first=True), ApproxBP()
    _fit_one_device(model, callback)
    assert not callback.report.converted and callback.report.probe == "none: converted by the user"
    assert {row.fqn for row in callback.report.rows} == {"net.0.0", "net.0.1", "net.0.2", "net.1.0", "net.1.1", "net.1.2"}
    assert {row.reason for row in callback.report.rows} == {"converted by the user (convert() in configure_model)"}
    assert isinstance(model.net[0][1], AffineMergedLinear) and len(model.losses) == 2


class LitTensorParallel(LitBuiltInConfigureModel):
    """Builds in ``configure_model`` and splits a linear layer by tensor parallelism there."""

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = nn.Sequential(_block(), _block(), nn.Linear(WIDTH, 1))
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], {"0.1": ColwiseParallel()})


@pytest.mark.usefixtures("one_process_group")
def test_a_model_split_by_tensor_parallelism_in_configure_model_fails_with_instructions() -> None:
    with pytest.raises(RuntimeError, match=r"tensor parallelism.*call `lightning_approxbp.convert\(model, example_input\)` in `configure_model`"):
        _fit_one_device(LitTensorParallel(), ApproxBP())


@pytest.mark.usefixtures("one_process_group")
def test_offload_with_a_memory_budget_on_a_model_sharded_in_configure_model_is_a_clear_error() -> None:
    # the budget itself is supported there (tests/lightning/test_fsdp2_budget.py); offload is not
    with pytest.raises(ValueError, match="offload=.*not supported on a model sharded with fully_shard"):
        _fit_one_device(LitBuiltInConfigureModel(), ApproxBP(memory_budget="1GiB", offload=True))
