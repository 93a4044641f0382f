"""The report has a row for every activation, norm and gated MLP, converted or left alone with the
real reason: packed gated MLPs (Phi-3), channels-first LayerNorms (ConvNeXt), activations called
as functions inside a forward, and norms refused on structure or on numerics.

Which modules need a row is read from their classes here (not from the conversion's own
recognisers), so a module the conversion overlooks is caught.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_approxbp import ConversionReport, convert
from lightning_approxbp.conversion import engine
from lightning_approxbp.nn import StepActivation
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.tolerances import IDENTICAL, NORM_FROM_OUTPUT, ROUNDING

transformers = pytest.importorskip("transformers")

_ACTIVATION_PACKAGES = ("torch.nn.modules.activation", "transformers.activations")


def _phi3() -> nn.Module:
    config = transformers.Phi3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return transformers.Phi3ForCausalLM(config).train()


def _ids() -> dict[str, Tensor]:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, patch_size=4, num_labels=3,
    )
    return transformers.ConvNextForImageClassification(config).train()


def _pixels() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class FunctionalGELUMLP(nn.Module):
    """An MLP whose activation is a function call in its forward, which no conversion can swap."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AffineFreeLayerNorm(nn.Module):
    """A LayerNorm without any affine that is not an nn.LayerNorm subclass."""

    def __init__(self, dim: int, *, declare_shape: bool = True) -> None:
        super().__init__()
        self.eps = 1e-5
        self.size = dim
        if declare_shape:
            self.normalized_shape = (dim,)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.size,), eps=self.eps)


class MaxNorm(nn.Module):
    """Shaped like a norm (a weight and an eps), but divides by the largest magnitude."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight / (x.abs().max(dim=-1, keepdim=True).values + self.eps)


def _needs_a_row(module: nn.Module) -> bool:
    name = type(module).__name__
    return (
        type(module).__module__ in _ACTIVATION_PACKAGES and not isinstance(module, (nn.Identity, nn.Dropout))
        or "Norm" in name
        or name.endswith("MLP")
    )


def _uncovered(original: nn.Module, report: ConversionReport) -> list[str]:
    """The activations, norms and gated MLPs of ``original`` without a row of their own or of a
    fused MLP around them (whose row says the activation inside is exact)."""
    rows = {row.fqn: row for row in report.rows}
    fused = [fqn for fqn, row in rows.items() if "fused" in row.strategy]
    return [
        fqn for fqn, module in original.named_modules()
        if _needs_a_row(module) and fqn not in rows and not any(fqn.startswith(f"{mlp}.") for mlp in fused)
    ]


def _gradients(model: nn.Module, loss: Tensor) -> Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _saved_bytes(model: nn.Module, run) -> int:
    with SavedTensorCounter(exclude=model.parameters()) as counter:
        run(model)
    return counter.stats.activation_bytes


# ----------------------------------------------------------------------------- packed gated MLPs


def test_phi3_packed_gated_mlps_are_fused_exactly() -> None:
    model = _phi3()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = convert(model, _ids())

    assert _uncovered(reference, report) == []
    for layer in range(2):
        row = report.row(f"model.layers.{layer}.mlp")
        assert (row.action, row.strategy) == ("converted", "fused packed gated MLP (silu)")
        assert "gate_up_proj makes gate (first half) and up" in row.reason
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(**_ids()).logits, reference(**_ids()).logits, **ROUNDING[torch.float32])
    # Fused gated MLPs and merged norms are exact: the gradients are the original ones.
    torch.testing.assert_close(
        _gradients(model, model(**_ids()).loss), _gradients(reference, reference(**_ids()).loss), **ROUNDING[torch.float32]
    )
    unfused = convert(copy.deepcopy(reference), _ids(), gated_mlp=False)
    assert report.bytes_after < unfused.bytes_after < unfused.bytes_before


def test_a_packed_gated_mlp_that_is_not_fused_keeps_its_activation_exact() -> None:
    reference = _phi3()
    model = copy.deepcopy(reference)
    report = convert(model, _ids(), gated_mlp=False)

    assert _uncovered(reference, report) == []
    mlp, act = report.row("model.layers.0.mlp"), report.row("model.layers.0.mlp.activation_fn")
    assert mlp.action == "skipped" and "gated_mlp=False" in mlp.reason and "halves of one tensor" in mlp.reason
    assert act.action == "skipped" and act.reason.startswith("left exact: inside the packed gated MLP")
    assert not any(isinstance(m, StepActivation) for m in model.modules())
    # Only exact conversions happened (merged norms): the gradients are the original ones.
    torch.testing.assert_close(
        _gradients(model, model(**_ids()).loss), _gradients(reference, reference(**_ids()).loss), **ROUNDING[torch.float32]
    )

    # Why: a step activation on its own saves nothing here, since the product saves the tensor
    # that holds gate and up anyway; it only adds its codes.
    by_hand = copy.deepcopy(reference)
    for layer in by_hand.model.layers:
        layer.mlp.activation_fn = StepActivation("silu")
    run = lambda m: m(**_ids()).loss  # noqa: E731 - one line, used twice
    assert _saved_bytes(by_hand, run) >= _saved_bytes(reference, run)


def test_a_packed_gated_mlp_with_a_lora_down_projection_is_reported_and_left_exact() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_phi3(), peft.LoraConfig(r=2, target_modules=["down_proj"], lora_dropout=0.0))
    report = convert(model, _ids())
    prefix = "base_model.model.model.layers.0.mlp"
    mlp, act = report.row(prefix), report.row(f"{prefix}.activation_fn")
    assert mlp.action == "skipped" and "down projection is a peft.tuners.lora" in mlp.reason
    assert "its activation is left exact" in mlp.reason
    assert act.action == "skipped" and "left exact" in act.reason


# ----------------------------------------------------------------------------- channels-first norms


def _channels_first(model: nn.Module) -> list[str]:
    return [fqn for fqn, m in model.named_modules() if getattr(m, "data_format", None) == "channels_first"]


def test_convnext_channels_first_layernorms_share_memory() -> None:
    model = _convnext()
    reference = copy.deepcopy(model)
    names = _channels_first(model)
    assert len(names) == 2  # the stem's norm and the downsampling norm
    report = convert(model, _pixels())

    assert _uncovered(reference, report) == []
    for fqn in names:
        row = report.row(fqn)
        assert row.action == "converted" and row.strategy.startswith("layer_norm channels-first keep"), row
    torch.testing.assert_close(model(_pixels()).logits, reference(_pixels()).logits, **ROUNDING[torch.float32])
    # A kept affine recovers the normalised value from the output: exact up to the division.
    torch.testing.assert_close(
        _gradients(model, model(_pixels()).logits.square().mean()),
        _gradients(reference, reference(_pixels()).logits.square().mean()),
        **NORM_FROM_OUTPUT[torch.float32],
    )
    without = convert(copy.deepcopy(reference), _pixels(), filter=lambda m, fqn: fqn not in names)
    assert report.bytes_after < without.bytes_after


# ----------------------------------------------------------------------------- functional activations


def test_an_activation_called_as_a_function_is_reported_as_left_exact() -> None:
    model = nn.Sequential(nn.LayerNorm(16), FunctionalGELUMLP())
    reference = copy.deepcopy(model)
    report = convert(model, torch.randn(2, 5, 16))

    row = report.row("1.gelu()")
    assert (row.kind, row.action) == ("F.gelu in FunctionalGELUMLP.forward", "skipped")
    assert "a gelu_tanh computed by calling F.gelu inside forward cannot be swapped" in row.reason
    assert "nn.GELU(approximate='tanh')" in row.reason
    assert report.row("0").action == "converted"
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model(x), reference(x), **ROUNDING[torch.float32])


def test_activations_with_rows_of_their_own_are_not_listed_again() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation="gelu", dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.GELU())
    report = convert(model, torch.randn(2, 5, 16))
    # nn.GELU and the layer's function attribute call F.gelu themselves; both are converted.
    assert [row.fqn for row in report.rows if "()" in row.fqn] == []
    assert report.row("0.activation").action == report.row("1").action == "converted"


@pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert")
def test_a_model_with_only_a_functional_activation_is_reported_and_unchanged() -> None:
    model = FunctionalGELUMLP()
    text, x = repr(model), torch.randn(2, 16)
    expected = model(x)
    report = convert(model, x)
    assert [row.fqn for row in report.rows] == ["gelu()"] and not report.converted
    assert repr(model) == text
    torch.testing.assert_close(model(x), expected, **IDENTICAL)


# ----------------------------------------------------------------------------- norm reasons


@pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert")
@pytest.mark.parametrize(
    ("norm", "action", "reason"),
    [
        (AffineFreeLayerNorm(16), "converted", "no affine parameters: exact"),
        (AffineFreeLayerNorm(16, declare_shape=False), "skipped",
         "structure: it has no weight and no normalized_shape attribute"),
        (MaxNorm(16), "skipped", "numerics: its output matches none of the forms"),
    ],
    ids=["affine-free", "affine-free-no-shape", "numerics"],
)
def test_norms_say_whether_structure_or_numerics_decided(norm: nn.Module, action: str, reason: str) -> None:
    model = nn.Sequential(nn.Linear(16, 16), norm, nn.Linear(16, 16))
    reference = copy.deepcopy(model)
    row = convert(model, torch.randn(4, 16)).row("1")
    assert row.action == action and reason in row.reason
    x = torch.randn(4, 16, requires_grad=True)
    torch.testing.assert_close(model(x), reference(x), **ROUNDING[torch.float32])


# ----------------------------------------------------------------------------- probe runs


class _ReadsValues(nn.Module):
    """A block whose forward reads a value, which fake tensors cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x)) * (1.0 if x.sum().item() > -1e9 else 0.0)


def _counting(batch: Tensor) -> tuple[list[int], object]:
    calls: list[int] = []

    def probe(model: nn.Module) -> Tensor:
        calls.append(1)
        return model(batch)

    return calls, probe


@pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert")
def test_the_probe_runs_once_when_nothing_changes() -> None:
    calls, probe = _counting(torch.randn(2, 16))
    report = convert(FunctionalGELUMLP(), probe=probe)
    assert len(calls) == 1 and report.bytes_before == report.bytes_after


def test_fake_tensors_are_not_tried_again_after_they_failed(monkeypatch) -> None:
    # More repeated blocks than the whole-model check takes, and "large": the probe runs on fake tensors if it can.
    monkeypatch.setattr(engine, "_REAL_PROBE_MAX_PARAMETERS", 0)
    model = nn.Sequential(*[_ReadsValues() for _ in range(engine._WHOLE_MODEL_MAX_REPEATS + 1)])
    calls, probe = _counting(torch.randn(2, 8))
    report = convert(model, probe=probe)
    assert report.converted
    assert len(calls) == 3  # the failed fake run, the real reference run, the real converted run


def test_a_small_model_with_values_probes_on_real_tensors() -> None:
    # Fake tensors would fail on its .item() and cost a third run: a small model never tries them.
    model = nn.Sequential(*[_ReadsValues() for _ in range(engine._WHOLE_MODEL_MAX_REPEATS + 1)])
    calls, probe = _counting(torch.randn(2, 8))
    assert convert(model, probe=probe).converted
    assert len(calls) == 2  # the reference run, the converted run
