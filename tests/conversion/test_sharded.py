"""``convert`` on a model that FSDP2's ``fully_shard`` already manages (one gloo process).

Converting after ``fully_shard`` must give the model that converting before it gives: the same
replacements, the same loss and gradients, the same state-dict keys, parameters still sharded,
and FSDP2's (module, name) pairs on the replacements (else it would gather into the old modules).
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_approxbp import convert
from lightning_approxbp.conversion.gated_mlp import FusedGatedMLP
from lightning_approxbp.conversion.merged import AffineMergedLinear
from tests.tolerances import IDENTICAL

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96,
)


@pytest.fixture
def process_group() -> Iterator[None]:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def _shard(model: LlamaForCausalLM, checkpointed: str = "") -> LlamaForCausalLM:
    """``fully_shard`` each layer and the root; ``checkpointed``: wrap each layer for activation
    checkpointing ``"before"`` or ``"after"`` sharding it."""
    for index, layer in enumerate(model.model.layers):
        if checkpointed == "before":
            layer = model.model.layers[index] = checkpoint_wrapper(layer)
        fully_shard(layer)
        if checkpointed == "after":
            model.model.layers[index] = checkpoint_wrapper(layer)
    fully_shard(model)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = _ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {
        name.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor() for name, p in model.named_parameters()
    }
    return loss.detach(), grads


def _assert_same_training(expected: nn.Module, actual: nn.Module) -> None:
    (loss, grads), (actual_loss, actual_grads) = _loss_and_grads(expected), _loss_and_grads(actual)
    torch.testing.assert_close(actual_loss, loss, **IDENTICAL)
    assert list(actual_grads) == list(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(actual_grads[name], grad, **IDENTICAL, msg=name)


def _converted_before_sharding() -> LlamaForCausalLM:
    model = _llama()
    convert(model, _ids())
    return _shard(model)


@pytest.mark.usefixtures("process_group")
def test_converting_after_fully_shard_equals_converting_before() -> None:
    model = _shard(_llama())
    keys = list(model.state_dict())
    report = convert(model, _ids())
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, FusedGatedMLP) and isinstance(layer.self_attn.q_proj, AffineMergedLinear)
    assert isinstance(layer, FSDPModule) and isinstance(model, FSDPModule)  # the units fully_shard made stay
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert list(model.state_dict()) == keys
    assert len(report.converted) == len(convert(_llama(), _ids()).converted)
    assert any("after fully_shard" in note for note in report.notes)
    # FSDP2 swaps gathered parameters into the replacements, not the modules they replaced
    owners = {
        id(fsdp_param._module_info.module)
        for fsdp_param in layer._get_fsdp_state()._fsdp_param_group.fsdp_params
    }
    assert id(layer.self_attn.q_proj) in owners and id(layer.input_layernorm) in owners
    _assert_same_training(_converted_before_sharding(), model)


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("checkpointed", ["", "before", "after"], ids=["plain", "checkpointed_first", "sharded_first"])
def test_a_meta_model_sharded_then_converted_trains_as_the_real_one_after_loading_weights(checkpointed: str) -> None:
    weights = _llama().state_dict()
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIG)
    _shard(model, checkpointed)
    convert(model, _ids())
    assert all(p.is_meta for p in model.parameters())
    layer = model.model.layers[0]
    assert isinstance(getattr(layer, "_checkpoint_wrapped_module", layer).mlp, FusedGatedMLP)
    model.to_empty(device="cpu")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    rotary = model.model.rotary_emb
    inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
    rotary.inv_freq.copy_(inv_freq)  # a non-persistent buffer: not in the state dict
    _assert_same_training(_converted_before_sharding(), model)


@pytest.mark.usefixtures("process_group")
def test_converting_a_sharded_model_twice_changes_nothing() -> None:
    model = _shard(_llama())
    convert(model, _ids())
    again = convert(model, _ids())
    assert not again.converted and {row.reason for row in again.rows} == {"already converted"}
    _assert_same_training(_converted_before_sharding(), model)


@pytest.mark.usefixtures("process_group")
def test_convert_refuses_tensor_parallel_parameters() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    mesh = dist.device_mesh.init_device_mesh("cpu", (1,))
    parallelize_module(model, mesh, {"1": ColwiseParallel()})
    before = copy.copy(model._modules)
    with pytest.raises(ValueError, match=r"convert\(\) must run before sharding here: .*tensor parallelism"):
        convert(model, torch.randn(2, 8))
    assert model._modules == before
