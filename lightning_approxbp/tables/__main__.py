"""Regenerate the shipped fitted tables: ``python -m lightning_approxbp.tables``.

Writes ``lightning_approxbp/tables/fitted.json`` and prints, for every activation and bit
width, the expected squared derivative error of the fitted table (and of the paper's table
where one exists) under the fitting distribution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_approxbp.activations import ACTIVATIONS
from lightning_approxbp.tables import FITTED_TABLES_FILE, SUPPORTED_BITS, get_table
from lightning_approxbp.tables.solver import (
    UNIFORM_WEIGHT,
    expected_squared_error,
    fit_table,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name(FITTED_TABLES_FILE), help="where to write the tables"
    )
    args = parser.parse_args(argv)

    entries = []
    print(f"{'activation':<12}{'bits':>5}{'fitted E[err^2]':>18}{'paper E[err^2]':>18}")
    for activation in ACTIVATIONS:
        for bits in SUPPORTED_BITS:
            fit = fit_table(activation, bits)
            entries.append(
                {
                    "activation": activation,
                    "bits": bits,
                    "thresholds": [round(t, 6) for t in fit.thresholds],
                    "levels": [round(v, 6) for v in fit.levels],
                    "expected_squared_error": float(f"{fit.expected_squared_error:.6g}"),
                }
            )
            paper = ""
            if bits == 2 and activation in ("gelu", "silu"):
                table = get_table(activation, bits, kind="paper")
                paper = f"{expected_squared_error(activation, table.thresholds, table.levels):.3e}"
            print(f"{activation:<12}{bits:>5}{fit.expected_squared_error:>18.3e}{paper:>18}")
    document = {
        "generated_by": "python -m lightning_approxbp.tables",
        "distribution": f"{1 - UNIFORM_WEIGHT:g} * MiniLM GELU pre-activations + {UNIFORM_WEIGHT:g} * Uniform[-8, 8]",
        "tables": entries,
    }
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
