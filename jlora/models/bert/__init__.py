"""BERT-family encoders (BERT, RoBERTa, MiniLM / sentence-transformers) and their HF key map."""

from jlora.models.bert.model import SHARDING, Bert, BertConfig, family, mean_pool
from jlora.models.bert.params import (
    PRESETS,
    config_from_hf,
    config_to_hf,
    hf_module,
    params_from_hf,
    params_to_hf,
    peft_task_type,
)

__all__ = [
    "PRESETS",
    "SHARDING",
    "Bert",
    "BertConfig",
    "config_from_hf",
    "config_to_hf",
    "family",
    "hf_module",
    "mean_pool",
    "params_from_hf",
    "params_to_hf",
    "peft_task_type",
]
