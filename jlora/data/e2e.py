"""The E2E NLG Challenge data as the LoRA and NOLA papers train on it (microsoft/LoRA,
`examples/NLG`): a meaning representation (MR) in, a restaurant description out.

The challenge's CSV rows are `mr` (`name[The Vaults], eatType[pub], priceRange[more than £30]`)
and `ref` (one human reference; an MR has several). The LoRA recipe (its data files come from
prefix-tuning, Li & Liang 2021) writes the MR as the context

    name : The Vaults | Type : pub | price : more than £30

(attributes in MR order, `eatType` → `Type`, `priceRange` → `price`, `familyFriendly` →
`family friendly`), and `gpt2_encode.py --add_bos --add_eos` encodes an example as
`context ids + [EOS]` (GPT-2's one special token, 50256, as a separator) followed by the
completion `ids(" " + ref) + [EOS]`; the loss covers the completion only (`data_utils.py`
`FT_Dataset`). Evaluation decodes from `context ids + [EOS]`, once per distinct MR, and scores
against all its references (`jlora.metrics.e2e`).

Deviation: the LoRA repository's files hold the references and MR values tokenized
(`more than £ 30`, `Blue Spice .`); jlora uses the challenge's own text. The metrics tokenize
both sides themselves (mteval, PTB), so scores compare, but the outputs read naturally.

Example:
  >>> linearize("name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]")
  'name : The Vaults | Type : pub | price : more than £30 | near : Café Adriatic'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["KEYS", "encode_examples", "encode_prompts", "linearize", "parse_mr"]

# The LoRA/prefix-tuning attribute names where they differ from the challenge's.
KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_ATTRIBUTE = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`[(attribute, value), ...]` of an MR string, in order; ValueError if it is not one.

    Example:
      >>> parse_mr("name[Blue Spice], customer rating[5 out of 5]")
      [('name', 'Blue Spice'), ('customer rating', '5 out of 5')]
    """
    pairs, pos = [], 0
    text = mr.strip()
    while pos < len(text):
        m = _ATTRIBUTE.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(
                f"mr {mr!r}: expected attribute[value] pairs separated by commas, like "
                "'name[The Vaults], eatType[pub]'"
            )
        pairs.append((m.group(1), m.group(2).strip()))
        pos = m.end()
    if not pairs:
        raise ValueError(f"mr {mr!r}: empty; expected attribute[value] pairs")
    return pairs


def linearize(mr: str) -> str:
    """The LoRA recipe's context text of an MR: `key : value` pairs joined by ` | `."""
    return " | ".join(f"{KEYS.get(k, k)} : {v}" for k, v in parse_mr(mr))


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text; with `special`, the special tokens the tokenizer adds (a BOS)."""
    if not texts:
        return []
    try:
        out = tokenizer(texts, add_special_tokens=special)["input_ids"]
    except TypeError:  # a tokenizer without the option (Llama2cTokenizer) adds BOS only
        out = tokenizer(texts)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        if not special and bos is not None:
            out = [ids[1:] if ids and ids[0] == bos else ids for ids in out]
    return [[int(i) for i in ids] for ids in out]


def _eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: E2E examples end (and separate) with it")
    return int(eos)


def encode_prompts(
    mrs: Sequence[str], tokenizer: Any, *, max_length: int = 512
) -> list[np.ndarray]:
    """`context ids + [EOS]` (int32) of each MR: what decoding starts from. A longer prompt
    keeps its last `max_length` tokens (the separator must stay last)."""
    eos = _eos(tokenizer)
    out = []
    for ids in _ids(tokenizer, [linearize(m) for m in mrs], True):
        out.append(np.asarray([*ids, eos][-max_length:], np.int32))
    return out


def encode_examples(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_length: int = 512
) -> list[dict[str, np.ndarray]]:
    """`{"input_ids": int32[n], "loss_mask": bool[n]}` per `(mr, ref)` row: the prompt of
    `encode_prompts`, then `ids(" " + ref) + [EOS]`, the loss on the latter (aligned with
    `input_ids` as `jlora.data.encode_sft`'s). Cut to `max_length` at the end.

    Example:
      >>> from jlora.models.llama2c import Llama2cTokenizer
      >>> from jlora.data.tasks import FIXTURES
      >>> tok = Llama2cTokenizer(FIXTURES / "tok512.bin")
      >>> ex = encode_examples([{"mr": "name[Tom]", "ref": "Tom is a pub."}], tok)[0]
      >>> ids, answer = ex["input_ids"], ex["loss_mask"]
      >>> tok.decode(ids[~answer]), tok.decode(ids[answer])
      ('name : Tom', 'Tom is a pub.')
    """
    eos = _eos(tokenizer)
    prompts = encode_prompts([str(r["mr"]) for r in rows], tokenizer, max_length=max_length)
    completions = _ids(tokenizer, [" " + str(r["ref"]) for r in rows], False)
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = np.concatenate([prompt, np.asarray([*completion, eos], np.int32)])
        mask = np.arange(len(ids)) >= len(prompt)
        out.append({"input_ids": ids[:max_length], "loss_mask": mask[:max_length]})
    return out
