"""LoRA (PEFT) fine-tuning of a small LLaMA in bf16 on BBC News text, with and without ApproxBP.

The ApproxBP run uses the ApproxBP callback (2-bit SiLU backward, memory-sharing RMSNorm) and
the ``ApproxBPPrecision("bf16-mixed")`` plugin (frozen base weights stored in bf16, so autocast
keeps no per-step copies of them), and, because the recipe's training step uses only the loss of
``model(..., labels=...)``, the fused linear + cross-entropy for the head and loss (the report's
``lm_head (LlamaForCausalLM)`` row): the step never builds the ``tokens x vocab`` logits. The
baseline is Lightning's ``precision="bf16-mixed"``.
No pretrained LLaMA is available offline: the base model is randomly initialised and frozen,
so the loss shows the adapters learning, not a useful language model. Prints the bytes a
training step saves for backward and the validation loss/perplexity (torchmetrics).

    python examples/causal_lm_lora.py               # both runs, compared
    python examples/causal_lm_lora.py --no-approxbp # baseline only
    python examples/causal_lm_lora.py --fast        # a few batches (CI)
"""

from __future__ import annotations

from typing import Any

from common import memory_setup, parse_args, report, result_row, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything

from lightning_approxbp.recipes import BBCNewsLMDataModule, LoRACausalLM


def run(approxbp: bool, fast: bool) -> dict[str, Any]:
    seed_everything(42)
    datamodule = BBCNewsLMDataModule(field="lead", max_length=64, batch_size=16, limit=200 if fast else 1000)
    model = LoRACausalLM(hidden_size=256, num_layers=4, lora_rank=16)
    trainer = Trainer(**memory_setup(approxbp), **trainer_kwargs(fast, max_epochs=2, name="causal_lm_lora"))
    trainer.fit(model, datamodule=datamodule)
    return result_row(trainer, approxbp, ("val_loss", "val_ppl"))


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    report(lambda approxbp: run(approxbp, args.fast), args)
