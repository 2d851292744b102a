"""Exports of jlora adapters for other tools, above the models (each model family names its
Hugging Face modules): `jlora.interop.peft` writes PEFT LoRA folders."""

from jlora.interop.peft import fold, hf_module, to_peft

__all__ = ["fold", "hf_module", "to_peft"]
