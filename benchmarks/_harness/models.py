"""Model widths the benchmarks build transformers models at, named once."""

from __future__ import annotations

# LLaMA-7B's layer width (the layer count and vocabulary are each benchmark's choice).
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}

# Toy widths of the short modes (--quick, --smoke): the same code paths, run in seconds.
TOY_ENCODER = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4}
TOY_LLAMA = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4}
