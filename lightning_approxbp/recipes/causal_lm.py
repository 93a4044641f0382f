"""Causal-LM LoRA fine-tuning: a small LLaMA-family model with PEFT adapters on BBC News text.

:class:`BBCNewsLMDataModule` tokenises BBC News leads (headline and first paragraph) for
next-token prediction; :class:`LoRACausalLM` wraps a ``LlamaForCausalLM`` built from a small
config (no pretrained LLaMA is available offline, so the base is randomly initialised and
frozen) with PEFT LoRA adapters, and reports loss and torchmetrics perplexity. Meant to run in
bf16: ``Trainer(precision="bf16-mixed")`` or ``plugins=[ApproxBPPrecision("bf16-mixed")]``.

The training step passes the labels to the model and uses only its loss, the way transformers
computes it (shifted by one, ``-100`` ignored). That is what lets the ApproxBP callback's default
``fused_loss="auto"`` route it through the fused linear + cross-entropy: in training the
``tokens x vocab`` logits are never built and ``outputs.logits`` is ``None``, which the conversion
report states. Validation runs in eval mode, where the model returns its logits as usual.

Example::

    from lightning.pytorch import Trainer
    from lightning_approxbp.plugins import ApproxBPPrecision
    from lightning_approxbp.recipes import BBCNewsLMDataModule, LoRACausalLM

    Trainer(max_epochs=1, plugins=[ApproxBPPrecision("bf16-mixed")]).fit(LoRACausalLM(), BBCNewsLMDataModule())
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from lightning_approxbp.recipes.bbc_news import bbc_news_split
from lightning_approxbp.recipes.text_classification import minilm_path

IGNORE_INDEX = -100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BBCNewsLMDataModule(LightningDataModule):
    """BBC News texts as token sequences for next-token prediction.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding).
    Tokenised with the offline MiniLM WordPiece tokenizer (vocabulary of 30,522).

    Args:
        field: ``"headline"``, ``"lead"`` or ``"full"``.
        max_length: tokens per sequence.
        batch_size: sequences per batch.
        limit: use only this many texts in total, for short runs.
        seed: seed of the split and of the training shuffle.
    """

    def __init__(
        self, field: str = "lead", max_length: int = 64, batch_size: int = 16, limit: int | None = None, seed: int = 42
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._train: list[Tensor] = []
        self._val: list[Tensor] = []

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary."""
        return 30522

    def setup(self, stage: str) -> None:
        if self._train:
            return
        from transformers import AutoTokenizer

        hp = self.hparams
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        train, val, _ = bbc_news_split(hp.field, 0.1, hp.seed, hp.limit)
        self._train = _encode(tokenizer, train.texts, hp.max_length)
        self._val = _encode(tokenizer, val.texts, hp.max_length)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader(self._train, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, shuffle=False)

    def _loader(self, sequences: list[Tensor], **kwargs: Any) -> DataLoader:
        batch_size = self.hparams.batch_size
        return DataLoader(sequences, batch_size=batch_size, collate_fn=collate_lm, **kwargs)  # type: ignore[arg-type]


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[Tensor]:
    return [torch.tensor(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def collate_lm(sequences: list[Tensor]) -> dict[str, Tensor]:
    """Right-pad with token 0; labels are the inputs with ``-100`` on padding."""
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LoRACausalLM(LightningModule):
    """A small ``LlamaForCausalLM`` with PEFT LoRA adapters; only the adapters train.

    Logs ``train_loss``, ``val_loss`` and ``val_ppl`` (torchmetrics perplexity).

    Args:
        vocab_size: vocabulary size (default: the MiniLM tokenizer's).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: LLaMA size.
        lora_rank, lora_alpha: LoRA settings; adapters on all attention and MLP projections.
        lr: AdamW learning rate.
        init_seed: seed of the base model's random initialisation.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 688,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lr: float = 2e-3,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            base = LlamaForCausalLM(config)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _outputs(self, batch: dict[str, Tensor]) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Only the loss: reading outputs.logits here would keep the fused loss off (it makes them None).
        loss = self._outputs(batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        outputs = self._outputs(batch)
        self.log("val_loss", outputs.loss, prog_bar=True)
        self.val_ppl(outputs.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)
