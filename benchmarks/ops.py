"""Per-op speed and saved bytes: ApproxBP ops against the torch ops they replace.

For each op: forward and backward time as a ratio to the torch op measured in the same run,
effective memory bandwidth against this device's measured copy bandwidth, and the bytes saved
for backward per element. Writes benchmarks/results/ops_<cpu|cuda>.{json,md}.

    python benchmarks/ops.py            # full sizes
    python benchmarks/ops.py --quick    # small sizes (CI keeps the script from rotting), prints only (or --out DIR)

On CPU the PyTorch path runs (several passes over memory, no fusion): its ratios tell what a
CPU user pays, not what the Triton kernels achieve; run on a GPU for those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _common import machine_name, machine_slug, median_time_ms
from _harness.records import Payload, arguments, out_folder, publish
from _harness.render import document, generated_by, table

from lightning_approxbp import functional as AF
from lightning_approxbp.saved_tensors import SavedTensorCounter


@dataclass
class OpResult:
    op: str
    baseline: str
    shape: tuple[int, ...]
    dtype: str
    forward_ms: float
    baseline_forward_ms: float
    backward_ms: float
    baseline_backward_ms: float
    forward_bandwidth_fraction: float | None
    backward_bandwidth_fraction: float | None
    saved_bytes_per_element: float
    baseline_saved_bytes_per_element: float

    @property
    def forward_speedup(self) -> float:
        return self.baseline_forward_ms / self.forward_ms

    @property
    def backward_speedup(self) -> float:
        return self.baseline_backward_ms / self.backward_ms


def copy_bandwidth(device: torch.device, numel: int, repeats: int) -> float:
    """Bytes per second of a plain device copy: the ceiling a memory-bound kernel can reach."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _bandwidth_fraction(nbytes: float, ms: float, bandwidth: float | None) -> float | None:
    return None if bandwidth is None else nbytes / (ms * 1e-3) / bandwidth


def saved_bytes_per_element(fn, x: torch.Tensor, params: list[torch.Tensor]) -> float:
    with SavedTensorCounter(exclude=params) as counter:
        fn(x)
    return counter.stats.activation_bytes / x.numel()


def bench_op(name, baseline_name, fn, baseline_fn, bytes_moved, shape, dtype, device, repeats, bandwidth, params=()):  # noqa: PLR0913
    """``bytes_moved(element_size) -> (forward_bytes, backward_bytes)`` per element for our op."""
    x = torch.randn(shape, device=device, dtype=dtype).mul_(2).requires_grad_()
    grad = torch.randn(shape, device=device, dtype=dtype)
    params = list(params)
    timings = {}
    for label, op in (("ours", fn), ("baseline", baseline_fn)):
        forward_ms = median_time_ms(lambda: op(x), device, repeats)
        out = op(x)
        backward_ms = median_time_ms(
            lambda: torch.autograd.grad(out, [x, *params], grad, retain_graph=True), device, repeats
        )
        timings[label] = (forward_ms, backward_ms)
    forward_bytes, backward_bytes = bytes_moved(x.element_size())
    numel = x.numel()
    return OpResult(
        op=name,
        baseline=baseline_name,
        shape=tuple(shape),
        dtype=str(dtype).removeprefix("torch."),
        forward_ms=timings["ours"][0],
        baseline_forward_ms=timings["baseline"][0],
        backward_ms=timings["ours"][1],
        baseline_backward_ms=timings["baseline"][1],
        forward_bandwidth_fraction=_bandwidth_fraction(forward_bytes * numel, timings["ours"][0], bandwidth),
        backward_bandwidth_fraction=_bandwidth_fraction(backward_bytes * numel, timings["ours"][1], bandwidth),
        saved_bytes_per_element=saved_bytes_per_element(fn, x, params),
        baseline_saved_bytes_per_element=saved_bytes_per_element(baseline_fn, x, params),
    )


def run(device: torch.device, dtype: torch.dtype, rows: int, cols: int, repeats: int) -> list[OpResult]:
    shape = (rows, cols)
    # Caches make CPU copy bandwidth meaningless at these sizes: report it on GPUs only.
    bandwidth = copy_bandwidth(device, rows * cols, repeats) if device.type == "cuda" else None
    weight = torch.ones(cols, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(cols, device=device, dtype=dtype, requires_grad=True)
    code_bytes = 2 / 8  # 2-bit codes

    def activation_bytes(size):  # fwd: read x, write y and codes; bwd: read codes and dy, write dx
        return 2 * size + code_bytes, 2 * size + code_bytes

    def norm_bytes(size):  # fwd: read x, write y; bwd: read y and dy, write dx (rstd is per row)
        return 2 * size, 3 * size

    cases = [
        ("step_activation gelu 2-bit", "F.gelu", lambda t: AF.step_activation(t, "gelu"), F.gelu, activation_bytes, ()),
        ("step_activation silu 2-bit", "F.silu", lambda t: AF.step_activation(t, "silu"), F.silu, activation_bytes, ()),
        ("ms_layer_norm (affine kept)", "F.layer_norm", lambda t: AF.ms_layer_norm(t, cols, weight, bias),
         lambda t: F.layer_norm(t, (cols,), weight, bias), norm_bytes, (weight, bias)),
        ("ms_rms_norm (affine kept)", "F.rms_norm", lambda t: AF.ms_rms_norm(t, cols, weight),
         lambda t: F.rms_norm(t, (cols,), weight, eps=1e-6), norm_bytes, (weight,)),
    ]
    return [
        bench_op(name, base, fn, base_fn, moved, shape, dtype, device, repeats, bandwidth, params)
        for name, base, fn, base_fn, moved, params in cases
    ]


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def render(payload: Payload) -> str:
    results = [OpResult(**r) for r in payload["results"]]
    lines = [
        "# Op benchmark",
        "",
        generated_by(payload, "ops.py") + ".",
        "Speed-ups are baseline time / our time in the same run (above 1 is faster).",
        "Bandwidth is our op's minimal bytes moved per second as a fraction of a device copy.",
        "",
        *table(["op", "vs", "shape", "dtype", "fwd speed-up", "bwd speed-up", "fwd BW", "bwd BW", "saved B/elem",
                "baseline saved B/elem"],
               [[r.op, r.baseline, "x".join(map(str, r.shape)), r.dtype, f"{r.forward_speedup:.2f}x",
                 f"{r.backward_speedup:.2f}x", _fraction(r.forward_bandwidth_fraction),
                 _fraction(r.backward_bandwidth_fraction), f"{r.saved_bytes_per_element:.3f}",
                 f"{r.baseline_saved_bytes_per_element:.3f}"] for r in results]),
    ]
    return document(lines)


def main() -> None:
    parser = arguments(__doc__, "small sizes and few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    # bf16 is what GPUs train in; CPUs emulate it slowly, so CPU numbers use fp32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, cols, repeats = (256, 1024, 5) if args.quick else (8192, 4096, 20) if device.type == "cuda" else (2048, 1024, 10)
    results = run(device, dtype, rows, cols, repeats)
    payload = {"machine": machine_name(device), "quick": args.quick, "results": [asdict(r) for r in results]}
    publish(f"ops_{machine_slug(device)}", payload, render, out_folder(args.out, args.quick))


if __name__ == "__main__":
    main()
