"""Run the model once on the probe batch, the way training runs it, without side effects.

Each run happens in train mode (dropout and other train-only paths are what the conversion
must be exact for), from the same random seed (so dropout masks agree between the original
and the converted model), and restores the caller's RNG state, module modes and buffers
(e.g. BatchNorm running statistics) afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_approxbp.saved_tensors import SavedTensorCounter

ProbeFn = Callable[[nn.Module], Any]
_SEED = 1234
_DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def probe_from_example(example_input: Any) -> ProbeFn:
    """Call the module like ``forward``: a tuple/list is unpacked, a mapping is passed as keywords.

    Example::

        >>> probe = probe_from_example({"input_ids": torch.ones(1, 4, dtype=torch.long)})
    """
    if isinstance(example_input, Mapping):
        return lambda module: module(**example_input)
    if isinstance(example_input, (tuple, list)):
        return lambda module: module(*example_input)
    return lambda module: module(example_input)


@dataclass
class ProbeRun:
    """Outputs (detached floating tensors, in order), saved-for-backward bytes, and what the
    optional context (e.g. the norm-use tracer) returned from ``finish(output)``."""

    outputs: list[Tensor]
    saved_bytes: int
    extra: Any = None


def output_tensors(output: Any) -> list[Tensor]:
    """The floating-point tensors of a (nested) output, detached, in a stable order."""
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    return [t.detach() for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]


@contextmanager
def isolated(module: nn.Module) -> Iterator[None]:
    """Train mode, a fixed seed, and the caller's RNG, modes and buffers restored on exit."""
    modes = {m: m.training for m in module.modules()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with isolate_rng():
            torch.manual_seed(_SEED)
            module.train()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def run_probe(module: nn.Module, probe: ProbeFn, wrap: Callable[[], Any] | None = None) -> ProbeRun:
    """Run ``probe(module)`` isolated, counting saved bytes.

    ``wrap()`` may add a context manager (the tracer) around the call; its ``finish(output)``
    result is returned as :attr:`ProbeRun.extra`.
    """
    extra = None
    with isolated(module), torch.enable_grad(), SavedTensorCounter(exclude=module.parameters()) as counter:
        if wrap is None:
            output = probe(module)
        else:
            with wrap() as context:
                output = probe(module)
                extra = context.finish(output)
    return ProbeRun(output_tensors(output), counter.stats.activation_bytes, extra)


def default_tolerance(dtype: torch.dtype) -> float:
    return _DEFAULT_TOLERANCE.get(dtype, 1e-4)


def max_relative_error(reference: list[Tensor], actual: list[Tensor]) -> tuple[float, int]:
    """Largest ``max|a - r| / max|r|`` over the outputs and the index where it occurs.

    Different structure, shape or dtype counts as an infinite error.
    """
    if len(reference) != len(actual):
        return float("inf"), -1
    worst, where = 0.0, -1
    for index, (ref, act) in enumerate(zip(reference, actual)):
        if ref.shape != act.shape or ref.dtype != act.dtype:
            return float("inf"), index
        if ref.numel() == 0:
            continue
        missing = ref.isnan()
        if not torch.equal(missing, act.isnan()):
            return float("inf"), index
        ref64, act64 = ref[~missing].double(), act[~missing].double()
        if ref64.numel() == 0:
            continue
        scale = ref64.abs().max().clamp(min=1e-12)
        error = ((act64 - ref64).abs().max() / scale).item()
        if error > worst:
            worst, where = error, index
    return worst, where
