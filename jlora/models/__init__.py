"""Pretrained model families in Flax Linen with checkpoint loaders.

Present: the Llama-family decoder (`jlora.models.llama`) and the llama2.c converter
(`jlora.models.llama2c`). Hugging Face loaders, BERT and `generate` are being added.
"""
