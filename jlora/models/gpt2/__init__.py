"""GPT-2 decoders (openai-community/gpt2 and its sizes, distilgpt2, GPT-2 fine-tunes)."""

from jlora.models.gpt2.model import GPT2, PRESETS, SHARDING, GPT2Config

__all__ = ["GPT2", "PRESETS", "SHARDING", "GPT2Config"]
