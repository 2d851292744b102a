"""Llama-family decoders (Llama 2, SmolLM2, stories260K ...)."""

from jlora.models.llama.model import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
