"""Model-level gradients equal an fp64 reference of the same step derivative.

The reference is the unconverted model in fp64 with every activation replaced by its exact
formula forward and the table's step derivative backward (``ops.reference``), norms left as
the original torch modules. The converted model (fp32, every technique on) must produce the
same parameter gradients to fp32 precision: measured relative L2 error 2e-7 to 1.3e-6 over all
cases, while exact backprop differs from the same reference by 3e-3 to 0.26. A wrong table, a
wrong threshold or a missing step derivative therefore fails, which the second test shows by
breaking each on purpose.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_approxbp import convert, tables
from lightning_approxbp.activations import get_activation
from lightning_approxbp.nn import StepActivation
from lightning_approxbp.ops.reference import step_activation_backward
from lightning_approxbp.ops.step_activation import StepActivationFunction
from lightning_approxbp.tables import StepTable
from tests.conversion.models import CASES, Case

# fp32 vs fp64 of the same formula: 1.3e-6 at most in the measured cases.
MAX_RELATIVE_ERROR = 1e-5


class _Fp64StepActivation(torch.autograd.Function):
    """Exact formula forward; ``grad * level[code(x)]`` backward, both in fp64."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: StepTable) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.table = table
        return get_activation(table.activation).formula(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        table = ctx.table
        return step_activation_backward(grad, x, table.thresholds, table.levels).to(grad.dtype), None


def _to_fp64(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {key: _to_fp64(value) for key, value in batch.items()}
    return batch.double() if isinstance(batch, Tensor) and batch.is_floating_point() else batch


def _gradients(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


def _step_reference(case: Case, original: nn.Module) -> Tensor:
    reference = copy.deepcopy(original)
    # Finds the activations (gated MLPs unfused, so theirs too); norms stay torch's own.
    convert(reference, case.batch, norms=False, gated_mlp=False)
    activations = [m for m in reference.modules() if isinstance(m, StepActivation)]
    assert activations, "the case has no activation to check"
    for module in activations:
        module.forward = lambda x, table=module.table: _Fp64StepActivation.apply(x, table)
    reference.double()
    batch = _to_fp64(case.batch)
    case.loss(reference(**batch) if isinstance(batch, dict) else reference(batch)).backward()
    return _gradients(reference)


def _converted_gradients(case: Case, original: nn.Module) -> Tensor:
    model = copy.deepcopy(original)
    convert(model, case.batch, gated_mlp=False)  # every activation takes the step derivative
    case.forward_loss(model).backward()
    return _gradients(model)


def _relative_error(case: Case, break_library: Callable[[], None] | None = None) -> float:
    original = case.build().train()
    reference = _step_reference(case, original)
    if break_library is not None:
        break_library()
    ours = _converted_gradients(case, original)
    return ((ours - reference).norm() / reference.norm()).item()


def test_gradients_equal_the_fp64_step_derivative_reference(case: Case) -> None:
    assert _relative_error(case) < MAX_RELATIVE_ERROR


def _shift_thresholds(table: StepTable) -> StepTable:
    return dataclasses.replace(table, thresholds=tuple(t + 0.1 for t in table.thresholds))


def _scale_levels(table: StepTable) -> StepTable:
    return dataclasses.replace(table, levels=tuple(v * 1.02 for v in table.levels))


@pytest.mark.parametrize("case_name", ["llama", "bert", "gpt2", "vit"])  # SiLU, GELU, tanh-GELU, GELU
@pytest.mark.parametrize("mutation", ["thresholds shifted by 0.1", "levels 2% off", "no step derivative"])
def test_a_broken_table_or_derivative_fails_the_reference_check(case_name: str, mutation: str, monkeypatch) -> None:
    def break_library() -> None:
        if mutation == "no step derivative":
            monkeypatch.setattr(StepActivationFunction, "backward", staticmethod(lambda ctx, grad: (grad, None)))
            return
        change = _shift_thresholds if mutation.startswith("thresholds") else _scale_levels
        for key, table in list(tables._FITTED_TABLES.items()):
            monkeypatch.setitem(tables._FITTED_TABLES, key, change(table))

    assert _relative_error(CASES[case_name], break_library) > 10 * MAX_RELATIVE_ERROR


@pytest.mark.parametrize("case_name", ["llama", "mistral", "qwen2", "gemma", "peft_llama"])
def test_models_with_fused_gated_mlps_have_exact_gradients(case_name: str) -> None:
    """Merged norms and fused gated MLPs are exact: the whole model's gradient equals fp64 autograd
    of the unconverted model (these decoders have no activation outside their MLPs)."""
    case = CASES[case_name]
    original = case.build().train()
    model = copy.deepcopy(original)
    report = convert(model, case.batch)
    assert sum("fused gated MLP" in row.strategy for row in report.rows) == 2
    assert not any(isinstance(m, StepActivation) for m in model.modules())
    case.forward_loss(model).backward()
    reference = copy.deepcopy(original).double()
    batch = _to_fp64(case.batch)
    case.loss(reference(**batch)).backward()
    ours, exact = _gradients(model), _gradients(reference)
    assert ((ours - exact).norm() / exact.norm()).item() < MAX_RELATIVE_ERROR
