"""The simulated step peak equals a real CPU run's, and the real model is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from lightning_approxbp import ConversionConfig, convert
from lightning_approxbp.memory import StepSimulation, estimate_step_memory
from lightning_approxbp.memory.fake import first_samples
from tests.memory.models import tiny_bert, tiny_llama

# estimator part -> MemTracker category
CATEGORIES = {
    "parameters": "Parameter", "buffers": "Buffer", "gradients": "Gradient", "optimizer_state": "Optstate",
    "activations": "Activation", "temporaries": "Temp", "inputs": "Other",
}
MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def real_peak(model: nn.Module, batch: dict, autocast: bool) -> dict[str, int]:
    """MemTracker's peak of the second of two real AdamW steps (the estimator's protocol, run for real)."""
    optimizer = torch.optim.AdamW(model.parameters())

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer, batch)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {str(kind.value if hasattr(kind, "value") else kind): value for kind, value in snapshot.items()}


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("converted", [False, True], ids=["as-is", "converted"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_simulated_peak_equals_a_real_cpu_run(name: str, precision: str, converted: bool):
    model, batch = MODELS[name]()
    estimate = estimate_step_memory(model, batch, precision=precision, convert=converted)
    real = copy.deepcopy(model)
    if converted:
        convert(real, first_samples(batch))
    expected = real_peak(real, batch, autocast=precision == "bf16-mixed")
    assert estimate.peak_bytes == expected["Total"]
    assert {part: estimate.parts[part] for part in CATEGORIES} == {p: expected[c] for p, c in CATEGORIES.items()}
    assert estimate.phase in ("forward", "backward", "optimizer step")


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_fused_loss_is_simulated_as_it_runs(precision: str):
    """The fused linear + cross-entropy on fake tensors (no value to test its incoming gradient
    against 1) takes the branch ``loss.backward()`` takes for real: the same peak as a real run."""
    model, batch = tiny_llama()
    config = ConversionConfig(fused_loss=True)
    estimate = estimate_step_memory(model, batch, precision=precision, convert=config)
    assert any("fused linear" in row.strategy for row in estimate.conversion.rows)
    real = copy.deepcopy(model)
    convert(real, first_samples(batch), config=config)
    expected = real_peak(real, batch, autocast=precision == "bf16-mixed")
    assert estimate.peak_bytes == expected["Total"]


@pytest.mark.filterwarnings("ignore:Module is None")
def test_the_real_model_is_not_touched():
    model, batch = tiny_llama()
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    estimate_step_memory(model, batch, precision="bf16-mixed", convert=True)
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0], name
        assert torch.equal(p.detach(), before[name][1]), name
        assert p.grad is None, name
    assert [type(m) for m in model.modules()] == modules  # not converted


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("name", list(MODELS))
def test_the_converted_step_keeps_fewer_activations(name: str):
    model, batch = MODELS[name]()
    baseline = estimate_step_memory(model, batch, precision="bf16-mixed")
    converted = estimate_step_memory(model, batch, precision="bf16-mixed", convert=ConversionConfig())
    assert converted.conversion is not None and converted.conversion.converted
    # at the end of the forward every saved activation is alive: compare what the forward leaves
    assert converted.parts["parameters"] == baseline.parts["parameters"]
    assert _forward_activations(model, batch, True) < _forward_activations(model, batch, False)


def _forward_activations(model: nn.Module, batch: dict, converted: bool) -> int:
    """What the whole forward leaves alive (every saved activation, at the end of the forward)."""
    simulation = StepSimulation(model, batch, precision="bf16-mixed", convert=converted)
    simulation.measure()
    before, after, _ = simulation.module_stats(simulation.model)
    return after - before


def test_errors_name_the_fix():
    model, batch = tiny_bert()
    with pytest.raises(ValueError, match="Unknown precision 'bf16'.*bf16-mixed"):
        estimate_step_memory(model, batch, precision="bf16")
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'.*adamw"):
        estimate_step_memory(model, batch, optimizer="lion")


@pytest.mark.filterwarnings("ignore:Module is None")
def test_the_table_names_the_parts_and_the_peak():
    model, batch = tiny_bert()
    text = str(estimate_step_memory(model, batch))
    for word in ("parameters", "gradients", "optimizer state", "activations", "temporaries", "peak"):
        assert word in text


@pytest.mark.filterwarnings("ignore:Module is None")
def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    """LoRA-style fine-tuning: MemTracker alone cannot hook frozen parameters; the estimator can."""
    model, batch = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    estimate = estimate_step_memory(model, batch, optimizer="sgd")
    assert estimate.parts["gradients"] <= trainable
    assert estimate.parts["optimizer_state"] == trainable  # SGD momentum: one buffer per trainable parameter
