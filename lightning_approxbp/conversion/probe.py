"""Run the model once on the probe batch, the way training runs it, without side effects.

Each run happens in train mode (dropout and other train-only paths are what the conversion
must be exact for), from the same random seed (so dropout masks agree between the original
and the converted model), and restores the caller's RNG state, module modes and buffers
(e.g. BatchNorm running statistics) afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

from lightning_approxbp.conversion.calls import ActivationCalls, watch_activation_calls
from lightning_approxbp.conversion.consumers import NormUses, trace_norm_uses
from lightning_approxbp.saved_tensors import SavedTensorCounter

ProbeFn = Callable[[nn.Module], Any]
_SEED = 1234
# fp64 gets 1e-6, not fp64 rounding: the models' own norms often compute in fp32 whatever the
# input dtype (transformers' Llama/Mistral/Qwen2/Gemma RMSNorms do), so the original is only
# fp32-accurate while the converted norms compute fp64 inputs in fp64 (measured: 1e-7).
_DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


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
    """Outputs (detached floating tensors, in order), saved-for-backward bytes, and, when the
    run was traced, where each norm's output went and which activations were called as functions."""

    outputs: list[Tensor]
    saved_bytes: int
    norm_uses: dict[nn.Module, NormUses] | None = None
    activation_calls: ActivationCalls = field(default_factory=dict)


def output_tensors(output: Any) -> list[Tensor]:
    """The floating-point tensors of a (nested) output, detached, in a stable order."""
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    return [t.detach() for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore Python's, NumPy's (if installed) and torch's RNG states (CUDA too) on exit."""
    python_state = random.getstate()
    try:
        import numpy

        numpy_state: Any = numpy.random.get_state()
    except ImportError:
        numpy, numpy_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


@contextmanager
def isolated(module: nn.Module) -> Iterator[None]:
    """Train mode, a fixed seed, and the caller's RNG, modes and buffers restored on exit."""
    modes = {m: m.training for m in module.modules()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with isolated_rng():
            torch.manual_seed(_SEED)
            module.train()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def run_probe(
    module: nn.Module,
    probe: ProbeFn,
    trace_norms: dict[nn.Module, int | None] | None = None,
    *,
    compute_free: bool = False,
    watch_activations: bool = False,
) -> ProbeRun:
    """Run ``probe(module)`` isolated, counting saved bytes.

    With ``trace_norms`` (norm module -> its number of features, ``None`` when it normalises
    several axes), the run also records where each norm's output goes
    (:attr:`ProbeRun.norm_uses`); with ``watch_activations``, the activations called as
    functions inside a module's forward (:attr:`ProbeRun.activation_calls`). ``compute_free``
    runs it on fake tensors (shapes, dtypes and the autograd graph, no arithmetic): the same
    uses and saved bytes at a fraction of the cost, but outputs without values.
    """
    uses = None
    calls: ActivationCalls = {}
    with isolated(module), torch.enable_grad(), _values_mode(module, compute_free) as fake_parameters:
        with SavedTensorCounter(exclude=[*module.parameters(), *fake_parameters]) as counter, ExitStack() as watches:
            if watch_activations:
                calls = watches.enter_context(watch_activation_calls(module))
            if trace_norms is None:
                output = probe(module)
            else:
                with trace_norm_uses(module, trace_norms) as tracer:
                    output = probe(module)
                    uses = tracer.finish(output)
    return ProbeRun(output_tensors(output), counter.stats.activation_bytes, uses, calls)


@contextmanager
def _values_mode(module: nn.Module, compute_free: bool) -> Iterator[list[Tensor]]:
    """Fake tensors for a compute-free run; yields the fake versions of the parameters (what
    autograd then saves in their place)."""
    if not compute_free:
        yield []
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(p) for p in module.parameters()]
    with mode:
        yield fakes


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
