"""Shared test utilities for the ops."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_approxbp.ops.dispatch import triton_interpreter_enabled

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton runs on CUDA, or on CPU through its interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (TRITON_DEVICE == "cpu" and not triton_interpreter_enabled()),
    reason="needs Triton with CUDA or TRITON_INTERPRET=1",
)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def interpreter_rounding_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance between the Triton and PyTorch paths.

    Triton's CPU interpreter narrows fp32 to bf16 by truncation, not round-to-nearest, so on CPU
    the two paths may differ by one bf16 unit; on a GPU both round to nearest.
    """
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": ulp(dtype), "atol": ulp(dtype) * 1e-2}
