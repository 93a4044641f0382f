"""torch.compile captures the ops as opaque nodes, on both paths.

The Triton path runs under Triton's CPU interpreter here (compiled kernels on a GPU): the ops
are ``torch.library`` custom ops whose fake implementations trace, so the compiled graph calls
the same launcher at run time.
"""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import functional as AF
from lightning_approxbp.ops import use_backend
from tests.tolerances import IDENTICAL

from .helpers import TRITON_DEVICE, requires_triton

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _block(x, weight, bias):
    return AF.step_activation(AF.ms_layer_norm(x, x.shape[-1], weight, bias) * 2, "gelu")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_compiled_graph_matches_eager_without_graph_breaks(backend):
    torch._dynamo.reset()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(4, 32, device=device, requires_grad=True)
    weight = torch.rand(32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    grad = torch.randn(4, 32, device=device)
    launched = []
    with use_backend(backend):
        eager_out = _block(x, weight, bias)
        eager = torch.autograd.grad(eager_out, (x, weight, bias), grad)
        compiled_fn = torch.compile(_block, fullgraph=True, backend="aot_eager")
        if backend == "triton":
            from lightning_approxbp.ops.kernel_launch import KernelLaunch

            original_run = KernelLaunch.run
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(KernelLaunch, "run", lambda self: (launched.append(self.kernel.__name__), original_run(self)))
                compiled_out = compiled_fn(x, weight, bias)
                compiled = torch.autograd.grad(compiled_out, (x, weight, bias), grad)
        else:
            compiled_out = compiled_fn(x, weight, bias)
            compiled = torch.autograd.grad(compiled_out, (x, weight, bias), grad)
    if backend == "triton":
        # The compiled graph ran every kernel, forward and backward.
        assert set(launched) == {
            "_ms_norm_fwd_kernel", "_step_activation_fwd_kernel", "_step_activation_bwd_kernel", "_ms_norm_bwd_kernel"
        }
    torch.testing.assert_close(compiled_out, eager_out, **IDENTICAL)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **IDENTICAL)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_every_op_passes_opcheck_forward_and_backward(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    ops = torch.ops.approxbp
    x = torch.randn(3, 8, device=device)
    weight, bias = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    with use_backend(backend):
        y, packed, nonfinite = ops.step_activation_forward(x.reshape(-1), [-0.5, 0.0, 0.5], "gelu", 2)
        norm_out, rstd = ops.ms_norm_forward(x, weight, bias, 1e-5, True, 0.0, torch.float32)
        cases = [
            (ops.step_activation_forward.default, (x.reshape(-1), [-0.5, 0.0, 0.5], "gelu", 2)),
            (ops.step_activation_backward.default, (torch.randn(24, device=device), packed, nonfinite, [0.0, 0.3, 0.7, 1.0], 2)),
            (ops.ms_norm_forward.default, (x, weight, bias, 1e-5, True, 0.0, torch.float32)),
            (ops.ms_norm_forward.default, (x, None, None, 1e-6, False, 0.0, torch.bfloat16)),
            (
                ops.ms_norm_backward.default,
                (torch.randn(3, 8, device=device), norm_out, rstd, weight, bias, True, 0.0, 1e-4, torch.float32),
            ),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)
