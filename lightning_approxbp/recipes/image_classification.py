"""Image classification: a small transformers ViT on scikit-learn's handwritten digits.

:class:`DigitsDataModule` serves the 1,797 offline 8x8 digits (``sklearn.datasets.load_digits``)
upsampled to ``image_size``; :class:`ViTClassifier` trains a ``ViTForImageClassification``
built from a small config (no download) and reports accuracy.

Example::

    from lightning.pytorch import Trainer
    from lightning_approxbp.recipes import DigitsDataModule, ViTClassifier

    Trainer(max_epochs=5).fit(ViTClassifier(), DigitsDataModule())
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(LightningDataModule):
    """scikit-learn digits as ``(1, image_size, image_size)`` images in [0, 1]; 10 classes.

    Args:
        image_size: side length after bilinear upsampling from 8x8.
        batch_size: samples per batch.
        val_fraction: share held out for validation (seeded split).
        limit: use only this many samples in total, for short runs.
        seed: seed of the split and of the training shuffle.
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        limit: int | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        from sklearn.datasets import load_digits

        hp = self.hparams
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(hp.image_size, hp.image_size), mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.seed))
        if hp.limit is not None:
            order = order[: hp.limit]
        n_val = max(1, round(len(order) * hp.val_fraction))
        self._val = TensorDataset(images[order[:n_val]], labels[order[:n_val]])
        self._train = TensorDataset(images[order[n_val:]], labels[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self._train, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ViTClassifier(LightningModule):
    """A ``ViTForImageClassification`` from a small config, trained from scratch.

    Logs ``train_loss``, ``val_loss`` and ``val_acc`` (torchmetrics multiclass accuracy).

    Args:
        image_size, patch_size, num_channels: input geometry.
        hidden_size, num_layers, num_heads, intermediate_size: transformer size.
        num_classes: number of labels.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        num_channels: int = 1,
        hidden_size: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 128,
        num_classes: int = 10,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            num_labels=num_classes,
        )
        self.model = ViTForImageClassification(config)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
