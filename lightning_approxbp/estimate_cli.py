"""``approxbp estimate --config approxbp.yaml``: the simulated step memory of a config, as is and converted.

Builds the config's model, datamodule and trainer the way ``fit`` would (nothing is trained),
takes the first train batch, and simulates one steady-state training step on fake tensors
(:func:`~lightning_approxbp.memory.estimate_step_memory`) with the model's ``training_step``,
its first ``configure_optimizers`` optimizer and the trainer's precision, once for the model as
it is and once converted with the config's ``ApproxBP`` options (the defaults if it has none).
Layers built in ``setup``/``configure_model`` and the precision plugin's own module changes
are not included.

Example::

    approxbp estimate --config configs/approxbp.yaml --data.batch_size=64
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_approxbp.callbacks.approxbp import ApproxBP
from lightning_approxbp.conversion import ConversionConfig
from lightning_approxbp.memory import (
    StepMemoryEstimate,
    estimate_step_memory,
    format_bytes,
)
from lightning_approxbp.memory.steps import configured_optimizer, training_step_loss


def estimate_main(built: LightningCLI) -> tuple[StepMemoryEstimate, StepMemoryEstimate]:
    """Print the baseline and converted estimates for a config's objects (``cli(args, run=False)``); return them."""
    model, datamodule, trainer = built.model, built.datamodule, built.trainer
    batch = _first_batch(model, datamodule)
    options = {"step": training_step_loss, "optimizer": configured_optimizer, "precision": str(trainer.precision)}
    callbacks = [c for c in trainer.callbacks if isinstance(c, ApproxBP)]
    config = callbacks[0].config if callbacks else ConversionConfig()
    baseline = estimate_step_memory(model, batch, **options)
    converted = estimate_step_memory(model, batch, convert=config, **options)
    print(side_by_side(baseline, converted))
    return baseline, converted


def _first_batch(model: Any, datamodule: Any) -> Any:
    source = datamodule if datamodule is not None else model
    with isolate_rng():
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
        return next(iter(source.train_dataloader()))


def side_by_side(baseline: StepMemoryEstimate, converted: StepMemoryEstimate) -> str:
    """Both estimates as one table and a one-line verdict."""
    rows = [("", "as it is", "converted", "change")]
    for part in baseline.parts:
        before, after = baseline.parts[part], converted.parts[part]
        rows.append((part.replace("_", " "), format_bytes(before), format_bytes(after), _change(before, after)))
    rows.append(("peak", format_bytes(baseline.peak_bytes), format_bytes(converted.peak_bytes),
                 _change(baseline.peak_bytes, converted.peak_bytes)))
    rows.append(("peak in", baseline.phase, converted.phase, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"Step memory, simulated ({baseline.precision}, {baseline.device}, one steady-state training step)"]
    lines += ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines) + "\n" + verdict(baseline, converted)


def verdict(baseline: StepMemoryEstimate, converted: StepMemoryEstimate) -> str:
    """One plain sentence on what the conversion does to the step's peak."""
    saved = baseline.peak_bytes - converted.peak_bytes
    if saved <= 0:
        return (
            f"Converting does not lower this step's peak: it is reached in the {converted.phase}, where weights, "
            "gradients and optimizer state dominate, not activations (a larger batch or sequence would change that)."
        )
    share = saved / baseline.peak_bytes
    return (
        f"Converting lowers the step's peak by {format_bytes(saved)} ({share:.0%}), from "
        f"{format_bytes(baseline.peak_bytes)} to {format_bytes(converted.peak_bytes)}; add some margin on a GPU for "
        "the CUDA context, library workspaces and the allocator's cache, which are not simulated."
    )


def _change(before: int, after: int) -> str:
    return f"{(after - before) / before:+.0%}" if before else ""
