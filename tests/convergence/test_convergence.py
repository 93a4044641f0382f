"""Training with and without the conversion: loss curves and final parameters agree.

Each tiny model of :mod:`tests.convergence.models` trains ``STEPS`` AdamW steps on the same
data from the same initialisation, unconverted and converted, in fp32 and under bf16 autocast.

- The default conversion approximates activation derivatives, so the runs drift apart; the
  drift must stay within the per-model bounds of ``tests.tolerances.CONVERGENCE``.
- An exact-only conversion (``activations=False``: norms, gated MLPs, dropout) must follow the
  unconverted run to fp32 rounding in fp32, and under bf16 stay within twice the distance that
  bf16 autocast itself puts between two unconverted runs (bf16 vs fp32).
- The bounds are tight enough to catch a wrong step table and a norm backward that is 1% off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lightning_approxbp import convert
from lightning_approxbp.conversion import ConversionConfig
from lightning_approxbp.ops import ms_norm, use_backend
from lightning_approxbp.tables import StepTable, get_table
from tests.tolerances import CONVERGENCE, EXACT_ONLY_FP32, LOW_PRECISION_ERROR_FACTOR, Convergence

from .models import MODELS, batches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 30
LEARNING_RATE = 1e-3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXACT_ONLY = ConversionConfig(activations=False)


@dataclass(frozen=True)
class Run:
    losses: Tensor  # one per step, fp64
    params: dict[str, Tensor]  # after the last step, by name


@dataclass(frozen=True)
class Drift:
    loss: float  # max |loss - baseline loss| over all steps
    final_loss: float  # |final loss / final baseline loss - 1|
    params: float  # ||params - baseline params|| / ||baseline params||, all parameters together

    def within(self, tolerance: Convergence) -> bool:
        return (
            self.loss <= tolerance.loss and self.final_loss <= tolerance.final_loss and self.params <= tolerance.params
        )


def train(name: str, dtype: torch.dtype, config: ConversionConfig | None) -> Run:
    torch.manual_seed(0)
    model = MODELS[name].build()
    data = batches(name)
    if config is not None:
        report = convert(model, data[0], config=config)
        assert report.converted, report
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**data[step % len(data)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    params = {key: value.detach().double() for key, value in model.named_parameters()}
    return Run(torch.tensor(losses, dtype=torch.float64), params)


# The unconverted and the ordinary converted runs are shared between tests (they are pure).
cached_train = functools.cache(train)


def drift(run: Run, baseline: Run) -> Drift:
    assert run.params.keys() == baseline.params.keys()
    squared = sum((run.params[k] - baseline.params[k]).pow(2).sum() for k in baseline.params)
    norm = sum(p.pow(2).sum() for p in baseline.params.values())
    return Drift(
        loss=(run.losses - baseline.losses).abs().max().item(),
        final_loss=abs(run.losses[-1].item() / baseline.losses[-1].item() - 1),
        params=(squared / norm).sqrt().item(),
    )


def low_precision_bound(name: str) -> Convergence:
    """Twice the drift bf16 autocast itself causes (unconverted bf16 run vs unconverted fp32 run).

    The final loss gets no bound of its own: bf16's own final-loss drift can be near zero by
    chance, and the loss bound covers every step, the last one included.
    """
    own = drift(cached_train(name, torch.bfloat16, None), cached_train(name, torch.float32, None))
    return Convergence(LOW_PRECISION_ERROR_FACTOR * own.loss, float("inf"), LOW_PRECISION_ERROR_FACTOR * own.params)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", MODELS)
def test_default_conversion_follows_the_unconverted_run(name, dtype):
    baseline = cached_train(name, dtype, None)
    assert baseline.losses[-1] < 0.9 * baseline.losses[0], "the model must learn, or the comparison says nothing"
    measured = drift(cached_train(name, dtype, ConversionConfig()), baseline)
    assert measured.within(CONVERGENCE[name, dtype]), measured


@pytest.mark.parametrize("name", MODELS)
def test_exact_only_conversion_matches_to_fp32_rounding(name):
    measured = drift(cached_train(name, torch.float32, EXACT_ONLY), cached_train(name, torch.float32, None))
    assert measured.within(EXACT_ONLY_FP32), measured


@pytest.mark.parametrize("name", MODELS)
def test_exact_only_conversion_under_bf16_is_within_bf16s_own_error(name):
    measured = drift(cached_train(name, torch.bfloat16, EXACT_ONLY), cached_train(name, torch.bfloat16, None))
    assert measured.within(low_precision_bound(name)), measured


@pytest.mark.parametrize("name", [name for name, model in MODELS.items() if model.activation is not None])
def test_a_wrong_step_table_fails_the_convergence_bounds(name):
    # The fitted table with its thresholds moved by 0.5: a plausible-looking table fitted to the
    # wrong pre-activations. (Scaling every level is no test: AdamW normalises it away.)
    fitted = get_table(MODELS[name].activation, bits=2)
    wrong = StepTable(fitted.activation, 2, tuple(t + 0.5 for t in fitted.thresholds), fitted.levels)
    measured = drift(train(name, torch.float32, ConversionConfig(table=wrong)), cached_train(name, torch.float32, None))
    assert not measured.within(CONVERGENCE[name, torch.float32]), measured


@pytest.mark.parametrize("name", MODELS)
def test_a_norm_backward_one_percent_off_fails_the_exact_bounds(name, monkeypatch):
    exact_backward = ms_norm._torch_backward

    def one_percent_off(*args, **kwargs):
        grad_input, grad_weight, grad_bias = exact_backward(*args, **kwargs)
        return grad_input * 1.01, grad_weight, grad_bias

    monkeypatch.setattr(ms_norm, "_torch_backward", one_percent_off)
    with use_backend("torch"):  # the patched PyTorch path, not the native kernel
        measured = drift(train(name, torch.float32, EXACT_ONLY), cached_train(name, torch.float32, None))
    assert not measured.within(EXACT_ONLY_FP32), measured
