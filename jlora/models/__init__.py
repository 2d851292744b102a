"""Pretrained model families in Flax Linen, with Hugging Face loaders and savers.

- decoders (`jlora.models.llama`): Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2; `generate`;
- GPT-2 (`jlora.models.gpt2`): GPT-2 and its sizes, with `generate` too;
- encoders (`jlora.models.bert`): BERT, RoBERTa, MiniLM, with a classification head;
- `load` / `save_hf` (Hugging Face folders, hub ids, GGUF, llama2.c, offline packages);
- `preset(model, "attention" | "all-linear")`: target regexes for `jlora.AdapterConfig`.

Example:
  >>> import jlora.models as jm
  >>> jm.preset("llama", "attention")
  'model/layers(_\\\\d+)?/self_attn/(q|k|v|o)_proj/kernel'
"""

from __future__ import annotations

from typing import Any

from jlora.models.generate import generate
from jlora.models.hub import QUANTIZE_PATTERN, load, save_hf

__all__ = ["QUANTIZE_PATTERN", "generate", "load", "preset", "save_hf", "sharding_rules"]


# Family name (a model's `family`) -> a transformers `model_type` that family serves.
_FAMILIES = {"llama": "llama", "gpt2": "gpt2", "bert": "bert"}


def preset(model: Any, name: str) -> str:
    """Target regex `name` ("attention" or "all-linear") for a model or a family name.

    Example:
      >>> preset("gpt2", "attention")
      'transformer/h(_\\\\d+)?/attn/c_attn/kernel'
    """
    from jlora.models.hub import family_of

    family = model if isinstance(model, str) else getattr(model, "family", None)
    if family not in _FAMILIES:
        raise ValueError(
            f"model family {family!r}: presets exist for {', '.join(map(repr, _FAMILIES))}"
        )
    PRESETS = family_of(_FAMILIES[family]).PRESETS
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def sharding_rules(model: Any) -> tuple:
    """The family's parameter layout rules (`jlora.sharding.Rule`s) for a jlora model.

    Example:
      >>> from jlora.models.bert import Bert, BertConfig
      >>> cfg = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1,
      ...                  num_attention_heads=1, intermediate_size=4)
      >>> sharding_rules(Bert(cfg))[0].pattern
      'embeddings/word_embeddings/embedding'
    """
    from jlora.models.hub import family_of

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"model={type(model).__name__}: expected a jlora.models model")
    return family_of(model_type).SHARDING
