"""Converted models under torch.compile: no graph breaks, the eager results, and the keep-norm
safety check still acting on compiled training (it runs eagerly after each optimizer step)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_approxbp import convert
from lightning_approxbp.conversion.norms import ConvertedNorm
from tests.conversion.models import CASES
from tests.tolerances import EXACT_GRADS_MAX_RELATIVE_FP32, IDENTICAL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# BERT's post-LN norms keep their affine (the safety check), LLaMA's RMSNorms and ViT's
# LayerNorms merge theirs; all three also convert their activations or gated MLPs.
COMPILED = ["bert", "llama", "vit"]
KEPT = "bert.encoder.layer.0.output.LayerNorm"


def _converted(name: str) -> torch.nn.Module:
    case = CASES[name]
    model = case.build().train()
    convert(model, case.batch)
    return model


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", COMPILED)
def test_converted_forward_has_no_graph_breaks(name):
    model = _converted(name)
    assert name != "bert" or model.get_submodule(KEPT).strategy == "keep"
    explanation = torch._dynamo.explain(CASES[name].forward_loss)(model)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_training_step_is_one_graph_with_the_eager_gradients(name):
    case = CASES[name]
    model = _converted(name)
    eager = copy.deepcopy(model)
    case.forward_loss(eager).backward()
    # fullgraph: any graph break in the forward is an error; the backward is the graph AOTAutograd
    # derives from that forward.
    compiled_loss = torch.compile(case.forward_loss, fullgraph=True, backend="aot_eager")
    compiled_loss(model).backward()
    for ours, theirs in zip(_grads(model), _grads(eager), strict=True):
        torch.testing.assert_close(ours, theirs, **IDENTICAL)


def test_a_weight_made_unsafe_by_an_optimizer_step_falls_back_under_compile():
    """The compiled forward does not read the weight; the step hook does, before the next forward."""
    case = CASES["bert"]
    model = case.build().train()
    reference = copy.deepcopy(model)
    convert(model, case.batch, activations=False)
    norm = model.get_submodule(KEPT)
    assert isinstance(norm, ConvertedNorm) and norm.strategy == "keep"
    counter = CompileCounterWithBackend("aot_eager")
    compiled_loss = torch.compile(case.forward_loss, backend=counter)
    compiled_loss(model).backward()
    model.zero_grad()
    assert counter.frame_count == 1

    # One SGD step (lr 1) that moves three weights to (almost) zero, as training could.
    unsafe = norm.weight.detach().clone()
    unsafe[:3] = torch.tensor([1e-6, 0.0, -1e-6])
    norm.weight.grad = norm.weight.detach() - unsafe
    with pytest.warns(UserWarning, match="now saves its input like a stock norm"):
        torch.optim.SGD([norm.weight], lr=1.0).step()
    assert norm.exact_fallback
    model.zero_grad()

    with torch.no_grad():
        reference.get_submodule(KEPT).weight.copy_(norm.weight)
    compiled_loss(model).backward()
    case.forward_loss(reference).backward()
    assert counter.frame_count == 2  # the flag that turned on recompiled the forward
    grads, expected = (torch.cat([g.flatten() for g in _grads(m)]) for m in (model, reference))
    assert ((grads - expected).abs().max() / expected.abs().max()).item() < EXACT_GRADS_MAX_RELATIVE_FP32
