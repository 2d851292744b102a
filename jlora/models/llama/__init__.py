"""Llama-family decoders: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, stories260K."""

from jlora.models.llama.model import PRESETS, SHARDING, Llama, LlamaConfig, RopeScaling

__all__ = ["PRESETS", "SHARDING", "Llama", "LlamaConfig", "RopeScaling"]
