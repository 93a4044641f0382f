"""Shared test utilities for the ops."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_approxbp.ops.dispatch import triton_interpreter_enabled
from lightning_approxbp.ops.native_cpu import native_available

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton runs on CUDA, or on CPU through its interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (TRITON_DEVICE == "cpu" and not triton_interpreter_enabled()),
    reason="needs Triton with CUDA or TRITON_INTERPRET=1",
)

requires_native = pytest.mark.skipif(not native_available(), reason="needs a C compiler for the native CPU kernels")
# The CPU implementations every CPU op test runs on: the PyTorch path and the native kernels.
CPU_BACKENDS = ["torch", pytest.param("native", marks=requires_native)]
