"""The main job as a user runs it: wall time, validation accuracy and peak memory on this machine.

Runs ``lightning fit --config configs/approxbp.yaml`` (the main job) and ``configs/baseline.yaml``
(the same job without the ApproxBP callback), each in a fresh process, alternating, ``--repeats``
times each. The wall time is the whole command: Python and library imports, loading the data and
the pretrained model, the conversion, training and validation. Also reported per run: the final
``val_acc`` and the peak host RSS (``peak_memory/host_rss_bytes``) from the run's CSV log, the
process's own peak RSS, and the machine: CPU model, cores, and whether it computes bf16 natively
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512-BF16 or AMX), which decides what
``precision: auto`` runs on a CPU.

    python benchmarks/main_job.py                    # writes results/main_job_cpu.{json,md}
    python benchmarks/main_job.py --quick            # 1 step on 64 headlines, prints only (or --out DIR)
    python benchmarks/main_job.py -- --trainer.max_epochs=2   # extra CLI arguments for both jobs
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import machine_name, run_child
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import document, table
from _harness.targets import TargetRow

ROOT = Path(__file__).resolve().parents[1]
RESULT = "main_job_cpu"
JOBS: dict[str, Path] = {"approxbp": ROOT / "configs" / "approxbp.yaml", "baseline": ROOT / "configs" / "baseline.yaml"}
TARGET_S = 120.0
TARGET_ACC = 0.85
TARGET_RATIO = 1.10  # approxbp / baseline whole-command wall time (issue 19)
# Toy size for the short mode: 1 step on 64 headlines, 1 validation batch.
QUICK_ARGS = [
    "--trainer.limit_train_batches=1", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0", "--data.init_args.limit=64",
]
TIMEOUT_S = 1800.0
# What ApproxBPPrecision("auto") logs when it has chosen.
AUTO_CHOICE = re.compile(r"ApproxBPPrecision\('auto'\) chose '([^']+)'")
# What the conversion report prints last: the conversion's own wall time (probe runs, checks, swaps).
CONVERSION_TIME = re.compile(r"conversion took ([0-9.]+) s")


def cpu_info() -> dict[str, Any]:
    """What decides the job's speed on a CPU: model, cores torch uses, native bf16."""
    return {
        "machine": machine_name(torch.device("cpu")),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__,
    }


def requested_precision(config: Path) -> str:
    """The precision a config asks for: the ApproxBPPrecision plugin's, else the trainer's."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    for plugin in trainer.get("plugins") or []:
        if isinstance(plugin, dict) and plugin.get("class_path", "").endswith("ApproxBPPrecision"):
            return str(plugin.get("init_args", {}).get("precision", "bf16-mixed"))
    return str(trainer.get("precision", "32-true"))


def read_metrics(log_dir: Path) -> dict[str, float | None]:
    """Final val_acc, peak host RSS and last saved-for-backward bytes from the run's metrics.csv."""
    rows = [row for path in log_dir.rglob("metrics.csv") for row in csv.DictReader(path.open())]

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name)]

    val_acc, host_rss, saved = column("val_acc"), column("peak_memory/host_rss_bytes"), column(
        "peak_memory/saved_activation_bytes"
    )
    return {
        "val_acc": val_acc[-1] if val_acc else None,
        "host_rss_bytes": max(host_rss) if host_rss else None,
        "saved_activation_bytes": saved[-1] if saved else None,
    }


def run_job(name: str, extra_args: list[str]) -> dict[str, Any]:
    """One ``lightning fit`` of a job in a fresh process, logging into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix=f"main_job_{name}_") as folder:
        logs = Path(folder)
        command = [
            sys.executable, "-m", "lightning_approxbp", "fit", "--config", str(JOBS[name]),
            f"--trainer.logger.init_args.save_dir={logs}", *extra_args,
        ]
        load = os.getloadavg()[0]  # other processes on the machine slow the run; record how busy it was
        child = run_child(command, cwd=logs, timeout_s=TIMEOUT_S)
        if child.returncode != 0:
            raise RuntimeError(f"{name} failed ({child.returncode}):\n{child.output[-3000:]}")
        metrics = read_metrics(logs)
    chosen = AUTO_CHOICE.search(child.output)
    conversion = CONVERSION_TIME.search(child.output)
    return {
        "job": name, "precision_used": chosen.group(1) if chosen else requested_precision(JOBS[name]),
        "wall_s": child.wall_s, "conversion_s": float(conversion.group(1)) if conversion else None, "cpu_s": child.cpu_s, "load_before": load,
        "process_max_rss_bytes": child.max_rss_bytes, **metrics,
    }


def native_build_s() -> float | None:
    """Seconds a first run on a machine spends building the native CPU kernels (into an empty cache).

    The jobs themselves load the cached library, as every run after the first on a machine does;
    the one-time build is measured apart and reported beside them. ``None``: no C compiler here.
    """
    probe = "import time; from lightning_approxbp.ops import native_cpu as n; t = time.perf_counter(); ok = n.native_available(); print(ok, time.perf_counter() - t)"
    with tempfile.TemporaryDirectory() as cache:
        child = run_child(["env", f"APPROXBP_NATIVE_CACHE={cache}", sys.executable, "-c", probe], timeout_s=600)
    available, seconds = child.output.split()[-2:]
    return float(seconds) if available == "True" else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per job: median and range of the wall times, the accuracies, and whether both targets are met.

    The time target is judged on the fastest run, the one least slowed by other processes on a
    shared machine; every run is listed with the load it started under.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in JOBS:
        own = [run for run in runs if run["job"] == name]
        walls, accs = [run["wall_s"] for run in own], [run["val_acc"] for run in own]
        summary[name] = {
            "runs": len(own),
            "median_wall_s": statistics.median(walls),
            "min_wall_s": min(walls),
            "max_wall_s": max(walls),
            "val_acc": accs,
            "max_process_rss_bytes": max(run["process_max_rss_bytes"] for run in own),
            "precision_used": sorted({run["precision_used"] for run in own}),
            "fastest_within_target_s": min(walls) <= TARGET_S,
            "reaches_target_acc": all(acc is not None and acc >= TARGET_ACC for acc in accs),
            "median_conversion_s": statistics.median(c) if (c := [r["conversion_s"] for r in own if r["conversion_s"]]) else None,
        }
    # Runs come in pairs (one of each job, order alternating): the ratio of each pair shares its spell of load.
    pairs = [
        a["wall_s"] / b["wall_s"]
        for a, b in zip([r for r in runs if r["job"] == "approxbp"], [r for r in runs if r["job"] == "baseline"])
    ]
    summary["approxbp"]["median_pair_ratio"] = statistics.median(pairs) if pairs else None
    return summary


def _precision_text(requested: str, used: list[str]) -> str:
    chosen = ", ".join(used)
    return chosen if [requested] == used else f"{requested} -> {chosen}"


def render(payload: Payload) -> str:
    summary, runs = payload["summary"], payload["results"]
    lines = [
        "# The main job: wall time and accuracy",
        "",
        (f"Machine: **{payload['machine']}** ({payload['logical_cpus']} logical CPUs; native bf16: "
        f"{'yes' if payload['bf16_native'] else 'no'}; torch {payload['torch']}). "
        "Generated by `python benchmarks/main_job.py`."),
        "",
        ("Each run is `lightning fit --config configs/<job>.yaml` in a fresh process; the wall time covers "
        "imports, data and model loading, the conversion, training and validation. "
        f"Targets: at most {TARGET_S:.0f} s and val_acc >= {TARGET_ACC}."),
    ]
    build = payload.get("native_build_s")
    lines.append(
        "Native CPU kernels: not available (no C compiler), the PyTorch path ran." if build is None else
        f"Native CPU kernels: loaded from the cache in every run; a first run on a machine builds them once, "
        f"measured apart: {build:.1f} s (not included below)."
    )
    if payload["extra_args"]:
        lines.append(f"Extra arguments: `{' '.join(payload['extra_args'])}`.")
    lines += ["", *table(
        ["job", "precision", "runs", "wall s (median, min-max)", "of which conversion s", "val_acc", "peak host RSS",
         "targets met (fastest run)"],
        [[name, _precision_text(payload["precision_requested"][name], row["precision_used"]), row["runs"],
          f"{row['median_wall_s']:.1f} ({row['min_wall_s']:.1f}-{row['max_wall_s']:.1f})",
          "-" if row.get("median_conversion_s") is None else f"{row['median_conversion_s']:.2f}",
          ", ".join(_accuracy(acc) for acc in row["val_acc"]), f"{row['max_process_rss_bytes'] / 2**30:.2f} GiB",
          "yes" if row["fastest_within_target_s"] and row["reaches_target_acc"] else "**no**"]
         for name, row in summary.items()])]
    ratio = summary["approxbp"].get("median_pair_ratio")
    if ratio is not None:
        verdict = "met" if ratio <= TARGET_RATIO else "**not met**"
        lines += ["", (f"approxbp / baseline wall time, median over pairs of runs: **{ratio:.3f}x** "
                       f"(target <= {TARGET_RATIO:.2f}x: {verdict}).")]
    return document([
        *lines,
        "",
        ("Runs in the order they ran (load = the machine's 1-minute load average as the run started; "
        f"{payload['logical_cpus']} means both cores were already busy):"),
        "",
        *table(["#", "job", "wall s", "CPU s", "load", "val_acc"],
               [[index, run["job"], f"{run['wall_s']:.1f}", f"{run['cpu_s']:.1f}", f"{run['load_before']:.1f}",
                 _accuracy(run["val_acc"])] for index, run in enumerate(runs, 1)]),
    ])


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def readme_targets(payload: Payload | None) -> list[TargetRow]:
    """Issues 10 and 19: the main job's wall time and accuracy on this CPU, and its ratio to the baseline job."""
    if payload is None:
        return []
    ours = payload["summary"]["approxbp"]
    where = f"{payload['logical_cpus']}-core CPU (native bf16: {'yes' if payload['bf16_native'] else 'no'})"
    rows = [TargetRow(f"Main job on a {where}: <= {payload['target_s']:.0f} s and val_acc >= {payload['target_acc']}",
                      f"{ours['min_wall_s']:.0f} s (fastest of {ours['runs']}), val_acc {min(ours['val_acc']):.4f}",
                      payload["machine"], ours["fastest_within_target_s"] and ours["reaches_target_acc"])]
    if ours.get("median_pair_ratio") is not None:
        rows.append(TargetRow(f"Main job on a {where}: <= {payload['target_ratio']:.2f}x the baseline job's wall time",
                              f"{ours['median_pair_ratio']:.3f}x (median of {ours['runs']} pairs)", payload["machine"],
                              ours["median_pair_ratio"] <= payload["target_ratio"]))
    return rows


def main() -> None:
    parser = arguments(__doc__, "1 step on 64 headlines, once each; print, do not write")
    parser.add_argument("--repeats", type=int, default=2, help="runs per job, alternating jobs (default 2)")
    parser.add_argument("extra", nargs="*", help="extra CLI arguments for both jobs, after `--`")
    args = parser.parse_args()
    extra = [*QUICK_ARGS, *args.extra] if args.quick else list(args.extra)
    repeats = 1 if args.quick else args.repeats
    precision = {name: requested_precision(path) for name, path in JOBS.items()}
    # Alternate the jobs, and which goes first in a pair, so that neither a busy spell on a shared
    # machine nor a warm file cache favours one job.
    order = list(JOBS)
    runs = [run_job(name, extra) for repeat in range(repeats) for name in (order if repeat % 2 == 0 else order[::-1])]
    payload = {
        **cpu_info(), "native_build_s": native_build_s(),
        "quick": args.quick, "extra_args": extra, "precision_requested": precision, "target_s": TARGET_S,
        "target_acc": TARGET_ACC, "target_ratio": TARGET_RATIO, "summary": summarise(runs), "results": runs,
    }
    publish(RESULT, payload, render, out_folder(args.out, args.quick))


if __name__ == "__main__":
    main()
