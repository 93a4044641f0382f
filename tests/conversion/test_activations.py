"""Activations are recognised by what they compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_approxbp import convert
from lightning_approxbp.conversion.activations import (
    function_attributes,
    identify_activation,
)
from lightning_approxbp.nn import StepActivation

transformers_activations = pytest.importorskip("transformers.activations")
ACT2FN = transformers_activations.ACT2FN


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("gelu", "gelu"),
        ("gelu_python", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_fast", "gelu_tanh"),
        ("gelu_accurate", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_python_tanh", "gelu_tanh"),
        ("quick_gelu", "quick_gelu"),
        ("silu", "silu"),
        ("swish", "silu"),
        ("gelu_10", None),  # clipped: differs for large inputs
        ("relu", None),
        ("mish", None),
        ("tanh", None),
        ("laplace", None),
    ],
)
def test_transformers_activations(key: str, expected: str | None) -> None:
    assert identify_activation(ACT2FN[key]) == expected


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.SiLU(), "silu"),
        (nn.ReLU(), None),
        (nn.Identity(), None),
        (nn.Dropout(0.0), None),
        (nn.Softmax(dim=-1), None),
    ],
)
def test_torch_modules(module: nn.Module, expected: str | None) -> None:
    assert identify_activation(module) == expected


def test_function_attribute_of_transformer_encoder_layer() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation="gelu", batch_first=True)
    assert [name for name, _ in function_attributes(layer)] == ["activation"]
    report = convert(layer, norms=False)
    assert isinstance(layer.activation, StepActivation)
    assert report.row("activation").kind == "function gelu"
    relu_layer = nn.TransformerEncoderLayer(16, 2, 32, activation="relu")
    with pytest.warns(UserWarning, match="nothing to convert"):
        convert(relu_layer, norms=False, dropout=False)
    assert relu_layer.activation is F.relu


def test_shared_activation_instance_is_replaced_everywhere() -> None:
    act = nn.SiLU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    report = convert(model, torch.randn(2, 4))
    assert model[1] is model[3] and isinstance(model[1], StepActivation)
    assert len(report.converted) == 1


@pytest.mark.parametrize(("bits", "table"), [(1, "fitted"), (4, "fitted"), (2, "paper")])
def test_bits_and_table_reach_the_module(bits: int, table: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    convert(model, torch.randn(2, 4), bits=bits, table=table)
    assert model[1].table.bits == bits and model[1].table.kind == table
