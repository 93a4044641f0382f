"""torch.compile captures the ops (PyTorch path on CPU; the Triton path is compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.ops import use_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _block(x, weight, bias):
    return AF.step_activation(AF.ms_layer_norm(x, x.shape[-1], weight, bias) * 2, "gelu")


def test_compiled_graph_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.rand(32, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    grad = torch.randn(4, 32)
    with use_backend("torch"):
        eager_out = _block(x, weight, bias)
        eager = torch.autograd.grad(eager_out, (x, weight, bias), grad)
        compiled_fn = torch.compile(_block, fullgraph=True, backend="aot_eager")
        compiled_out = compiled_fn(x, weight, bias)
        compiled = torch.autograd.grad(compiled_out, (x, weight, bias), grad)
    torch.testing.assert_close(compiled_out, eager_out)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_ops_are_registered_with_torch_library():
    for name in ("step_activation_forward", "step_activation_backward", "ms_norm_forward", "ms_norm_backward"):
        assert hasattr(torch.ops.approxbp, name)
    torch.library.opcheck(
        torch.ops.approxbp.step_activation_forward.default, (torch.randn(9), [-0.5, 0.0, 0.5], "gelu", 2)
    )
    torch.library.opcheck(
        torch.ops.approxbp.ms_norm_forward.default,
        (torch.randn(3, 8), torch.rand(8), None, 1e-5, True, 0.0, torch.float32),
    )
