"""The engine as one rule per technique: the config's parts and presets, derived "already
converted", replacements built through ``__init__``, and a technique added as one rule."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch
from torch import nn

from lightning_approxbp import ConversionConfig, OptionError, convert
from lightning_approxbp.conversion import engine
from lightning_approxbp.conversion.activations import ActivationConfig
from lightning_approxbp.conversion.config import PRESETS, VerifyConfig
from lightning_approxbp.conversion.dropout import DropoutConfig
from lightning_approxbp.conversion.fused_loss import FusedLossConfig
from lightning_approxbp.conversion.gated_mlp import GatedMLPConfig
from lightning_approxbp.conversion.norms import NormConfig, NormSpec
from lightning_approxbp.conversion.rule import Candidate, ConversionState, Rule
from lightning_approxbp.conversion.walker import Site
from lightning_approxbp.nn import (
    AffineMergedLinear,
    ConvertedLayerNorm,
    ConvertedNorm,
    ConvertedRMSNorm,
    FusedGatedExperts,
    FusedGatedMLP,
    FusedLMHead,
    RegeneratedDropout,
    SharedInputLinear,
    StepActivation,
)
from lightning_approxbp.nn.gated_experts import GatedExpertsSpec
from lightning_approxbp.nn.gated_mlp import GatedMLPSpec

PARTS = (ActivationConfig, NormConfig, GatedMLPConfig, DropoutConfig, FusedLossConfig, VerifyConfig)


def test_every_option_belongs_to_exactly_one_part_with_the_same_default() -> None:
    owners = [f.name for part in PARTS for f in fields(part)]
    assert sorted(owners) == sorted(f.name for f in fields(ConversionConfig))
    default = ConversionConfig()
    assert all(default.part(part) == part() for part in PARTS)


def test_a_config_composed_of_parts_is_the_flat_one() -> None:
    composed = ConversionConfig.compose(ActivationConfig(bits=4), NormConfig(affine="merge"), verify=False)
    assert composed == ConversionConfig(bits=4, affine="merge", verify=False)
    assert composed.part(NormConfig) == NormConfig(affine="merge")


def test_each_part_checks_its_own_options() -> None:
    with pytest.raises(OptionError, match="bits=3"):
        ActivationConfig(bits=3)
    with pytest.raises(ValueError, match="only applies to norms"):
        ConversionConfig(norms=False, affine="keep")
    with pytest.raises(ValueError, match="tolerance only applies with verify=True"):
        ConversionConfig.compose(VerifyConfig(verify=False), tolerance=1e-3)


def test_presets() -> None:
    assert ConversionConfig.preset("default") == ConversionConfig()
    paper = ConversionConfig.preset("paper")
    assert paper == ConversionConfig(
        table="paper", gated_mlp=False, dropout=False, share_norm_output=False, fused_loss=False
    )
    assert ConversionConfig.preset("paper", verify=False).verify is False
    assert set(PRESETS) >= {"default", "paper"}
    with pytest.raises(OptionError, match="preset='papr'.*Did you mean 'paper'"):
        ConversionConfig.preset("papr")
    with pytest.raises(ValueError, match="The paper's tables have 2 bits"):
        ConversionConfig.preset("paper", bits=4)


def test_the_paper_preset_converts_as_published() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 8))
    report = convert(model, torch.randn(3, 8), config=ConversionConfig.preset("paper"))
    assert report.row("2").strategy == "step gelu 2-bit paper"
    assert type(model[3]) is nn.Dropout
    assert isinstance(model[0], ConvertedLayerNorm) and isinstance(model[1], AffineMergedLinear)


def test_already_converted_is_what_the_rules_put_in_place() -> None:
    converted = {kind for rule in engine.RULES for kind in rule.converted}
    expected = {StepActivation, ConvertedNorm, FusedGatedMLP, FusedGatedExperts, RegeneratedDropout}
    assert expected | {SharedInputLinear, AffineMergedLinear} <= converted


def _counting_init(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[type]:
    calls: list[type] = []
    original = cls.__init__

    def init(self: nn.Module, *args: object, **kwargs: object) -> None:
        calls.append(cls)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", init)
    return calls


@pytest.mark.parametrize(
    ("cls", "build"),
    [
        (ConvertedLayerNorm, lambda: ConvertedLayerNorm.from_module(
            nn.LayerNorm(4), NormSpec((4,), 1e-5, True, 0.0, True, True), "keep", "input")),
        (ConvertedRMSNorm, lambda: ConvertedRMSNorm.from_module(
            nn.RMSNorm(4), NormSpec((4,), None, False, 0.0, True, False), "merge", "autocast")),
        (SharedInputLinear, lambda: SharedInputLinear.from_module(nn.Linear(4, 2))),
        (AffineMergedLinear, lambda: AffineMergedLinear.from_module(nn.Linear(4, 2), affine_source=nn.LayerNorm(4))),
        (FusedGatedMLP, lambda: FusedGatedMLP.from_module(nn.Module(), GatedMLPSpec("a", "b", "c", "silu", None))),
        (FusedGatedExperts, lambda: FusedGatedExperts.from_module(nn.Module(), GatedExpertsSpec("silu", None, True))),
        (RegeneratedDropout, lambda: RegeneratedDropout.from_module(nn.Dropout(0.2))),
        (StepActivation, lambda: StepActivation.from_module(nn.GELU(), "gelu")),
        (FusedLMHead, lambda: FusedLMHead.from_module(nn.Linear(4, 8))),
    ],
)
def test_replacements_are_built_through_init(monkeypatch: pytest.MonkeyPatch, cls: type, build) -> None:
    calls = _counting_init(monkeypatch, cls)
    new = build()
    assert calls == [cls] and type(new) is cls


def test_a_replacement_holds_the_original_parameters_and_mode() -> None:
    linear = nn.Linear(4, 2).eval()
    merged = AffineMergedLinear.from_module(linear, affine_source=nn.LayerNorm(4))
    assert merged.weight is linear.weight and merged.bias is linear.bias and not merged.training
    assert list(merged.state_dict()) == list(linear.state_dict())
    norm = nn.LayerNorm(4)
    converted = ConvertedLayerNorm.from_module(norm, NormSpec((4,), 1e-5, True, 0.0, True, True), "merge", "input")
    assert converted.weight is norm.weight and converted.bias is norm.bias and not converted.weight.is_meta


@dataclass(frozen=True)
class _NoOptions:
    """A technique without options: its part of the config is empty."""


class _Halve(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


class _HalveRule(Rule):
    """A toy technique: ``nn.Identity`` modules whose forward is a no-op become ``_Halve``."""

    name = "halve"
    config_type = _NoOptions
    converted = (_Halve,)

    def find(self, site: Site, state: ConversionState) -> bool:
        if type(site.module) is not nn.Identity:
            return False
        state.add(self, Candidate(site))
        return True

    def apply(self, plan: Candidate, state: ConversionState) -> None:
        state.log.replace_site(plan.site, _Halve())
        state.report.add(plan.site.fqn, "Identity", "converted", "halved")


def test_a_technique_is_one_rule_in_the_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "RULES", (*engine.RULES, _HalveRule()))
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Identity())
    report = convert(model, torch.randn(2, 4), verify=False)
    assert isinstance(model[2], _Halve) and report.row("2").strategy == "halved"
    again = convert(model, torch.randn(2, 4), verify=False)
    assert again.row("2").action == "unchanged"


def test_the_norms_swap_before_the_gated_mlps_that_hold_their_consumers() -> None:
    """The ordering RULES states: a fused gated MLP takes over the merged gate and up projections."""
    pytest.importorskip("transformers")
    from tests.conversion.models import CASES

    case = CASES["llama"]
    model = case.build()
    convert(model, case.batch)
    for layer in model.model.layers:
        assert isinstance(layer.mlp, FusedGatedMLP)
        assert isinstance(layer.mlp.gate_proj, AffineMergedLinear) and isinstance(layer.mlp.up_proj, AffineMergedLinear)
        assert layer.mlp.gate_proj.affine_source is layer.post_attention_layernorm
