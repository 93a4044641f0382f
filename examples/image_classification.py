"""Train a small transformers ViT on scikit-learn's handwritten digits, with and without ApproxBP.

Everything is offline: ``ViTForImageClassification`` is built from a small config (image 32,
patch 4, hidden 64) and the 1,797 8x8 digits ship with scikit-learn. The ApproxBP run uses the
callback and the ``ApproxBPPrecision("bf16-mixed")`` plugin; the baseline is Lightning's
``precision="bf16-mixed"``. Prints the bytes a training step saves for backward and the
validation accuracy (torchmetrics) of each run.

    python examples/image_classification.py               # both runs, compared
    python examples/image_classification.py --approxbp    # ApproxBP only
    python examples/image_classification.py --fast        # a few batches (CI)
"""

from __future__ import annotations

from typing import Any

from common import memory_setup, parse_args, report, result_row, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything

from lightning_approxbp.recipes import DigitsDataModule, ViTClassifier


def run(approxbp: bool, fast: bool) -> dict[str, Any]:
    seed_everything(42)
    datamodule = DigitsDataModule(image_size=32, batch_size=64)
    model = ViTClassifier(image_size=32, patch_size=4, hidden_size=64, num_layers=4, num_heads=4, lr=2e-3)
    trainer = Trainer(**memory_setup(approxbp), **trainer_kwargs(fast, max_epochs=8, name="image_classification"))
    trainer.fit(model, datamodule=datamodule)
    return result_row(trainer, approxbp, ("val_acc", "val_loss"))


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    report(lambda approxbp: run(approxbp, args.fast), args)
