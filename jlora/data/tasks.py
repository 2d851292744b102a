"""Task encoders: rows (dicts of text) to token arrays for classification and causal-LM SFT.

A tokenizer is anything callable as `tokenizer(list_of_texts)["input_ids"]` that returns one id
list per text with its special tokens (transformers' tokenizers, `Llama2cTokenizer`); `encode_sft`
also reads `tokenizer.eos_token_id`.

- `encode_classification`: `{"input_ids": int32[n], "label": int}`;
- `encode_sft`: `{"input_ids": int32[n], "loss_mask": bool[n]}` with the loss on the answer only;
- `encode_prompts`: `{"input_ids": int32[n], "reference": str}` for generation-based evaluation.

`loss_mask` is aligned with `input_ids` (not shifted): `loss_mask[t]` is True exactly when token
`input_ids[t]` is an answer token (the answer text and the EOS after it), i.e. a target the model
must predict from the logits at position t - 1. `loss_mask[0]` is always False. A causal-LM loss
shifts both together: logits[:, :-1] against input_ids[:, 1:] weighted by loss_mask[:, 1:]
(`jlora.data.collate.next_token_targets` does this at fixed shape).

Example:
  >>> from jlora.models.llama2c import Llama2cTokenizer
  >>> tok = Llama2cTokenizer(FIXTURES / "tok512.bin")
  >>> ex = encode_sft([{"q": "Hi", "answer": "Yes"}], tok, prompt_template="Q: {q}\\nA:")[0]
  >>> tok.decode(ex["input_ids"][ex["loss_mask"]]), int(ex["input_ids"][-1])
  ('Yes', 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.data.gsm8k import exact_match, extract_answer

__all__ = ["encode_classification", "encode_prompts", "encode_sft", "exact_match", "extract_answer"]

# The stories260K tokenizer the doctests use.
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "stories260K"


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with the special tokens the tokenizer adds."""
    if not texts:
        return []
    out = tokenizer(texts)["input_ids"]
    return [[int(i) for i in ids] for ids in out]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "all_special_ids", None)
    if ids is None:
        ids = [getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id")]
    return {int(i) for i in ids if i is not None}


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length {max_length!r}: expected an int >= 2")


def _field(row: Mapping[str, Any], field: str, arg: str, i: int) -> Any:
    if field not in row:
        raise ValueError(f"{arg} {field!r}: missing from row {i}, whose fields are {sorted(row)}")
    return row[field]


def _format(template: str, row: Mapping[str, Any], i: int) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise ValueError(
            f"prompt_template {template!r}: placeholder {e.args[0]!r} is not a field of row {i}; "
            f"fields are {sorted(row)}"
        ) from None


def encode_classification(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    text_field: str = "sentence",
    label_field: str = "label",
    max_length: int = 64,
) -> list[dict[str, Any]]:
    """`{"input_ids": int32[n], "label": int}` per row, n <= max_length.

    Over-long texts are cut to max_length, keeping a final special token (BERT's [SEP]) last.

    Example:
      >>> from jlora.models.llama2c import Llama2cTokenizer
      >>> tok = Llama2cTokenizer(FIXTURES / "tok512.bin")
      >>> ex = encode_classification([{"sentence": "a fine film", "label": "1"}], tok)[0]
      >>> ex["input_ids"].dtype, ex["label"], tok.decode(ex["input_ids"])
      (dtype('int32'), 1, 'a fine film')
    """
    _check_max_length(max_length)
    texts = [str(_field(r, text_field, "text_field", i)) for i, r in enumerate(rows)]
    labels = []
    for i, r in enumerate(rows):
        value = _field(r, label_field, "label_field", i)
        try:
            labels.append(int(value))
        except (TypeError, ValueError):
            raise ValueError(
                f"label_field {label_field!r}: value {value!r} of row {i} is not an integer label"
            ) from None
    special = _special_ids(tokenizer)
    out = []
    for ids, label in zip(_tokenize(tokenizer, texts), labels, strict=True):
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:] if ids[-1] in special else ids[:max_length]
        out.append({"input_ids": np.asarray(ids, np.int32), "label": label})
    return out


def encode_sft(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_template: str,
    answer_field: str = "answer",
    answer_prefix: str = " ",
    max_length: int = 256,
    eos: bool = True,
) -> list[dict[str, Any]]:
    """`{"input_ids": int32[n], "loss_mask": bool[n]}` per row: prompt, answer, EOS; loss on answer.

    The text is `prompt_template.format(**row) + answer_prefix + row[answer_field]`, tokenised
    whole (so the ids are those the tokenizer gives the full text), then EOS if `eos` and the
    tokenizer did not end with it. The prompt's tokens are the longest common prefix of the
    full text's ids and the prompt's own ids; `loss_mask` is True on every token after them
    (aligned with `input_ids`; see the module docstring). If a BPE merge crosses the boundary,
    the merged token counts as answer. Sequences longer than max_length are cut at the end, so
    an answer may lose its tail and EOS (check `loss_mask.any()` to drop fully cut answers).

    Example:
      >>> from jlora.models.llama2c import Llama2cTokenizer
      >>> tok = Llama2cTokenizer(FIXTURES / "tok512.bin")
      >>> ex = encode_sft([{"question": "2+2?", "answer": "4"}], tok,
      ...                 prompt_template="Question: {question}\\nAnswer:")[0]
      >>> [tok.pieces[i] for i in ex["input_ids"][ex["loss_mask"]]]  # " 4" and EOS
      [b' ', b'4', b'\\n</s>\\n']
    """
    _check_max_length(max_length)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos and eos_id is None:
        raise ValueError(f"eos {eos!r}: the tokenizer has no eos_token_id; pass eos=False")
    prompts = [_format(prompt_template, r, i) for i, r in enumerate(rows)]
    answers = [str(_field(r, answer_field, "answer_field", i)) for i, r in enumerate(rows)]
    fulls = [p + answer_prefix + a for p, a in zip(prompts, answers, strict=True)]
    ids_all = _tokenize(tokenizer, prompts + fulls)
    prompt_ids, full_ids = ids_all[: len(rows)], ids_all[len(rows) :]
    out = []
    for p, ids in zip(prompt_ids, full_ids, strict=True):
        k = 0
        while k < min(len(p), len(ids)) and p[k] == ids[k]:
            k += 1
        if eos and (not ids or ids[-1] != eos_id):
            ids = [*ids, int(eos_id)]
        mask = np.arange(len(ids)) >= max(k, 1)
        out.append(
            {
                "input_ids": np.asarray(ids[:max_length], np.int32),
                "loss_mask": mask[:max_length],
            }
        )
    return out


def encode_prompts(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_template: str,
    answer_field: str = "answer",
    max_length: int = 256,
) -> list[dict[str, Any]]:
    """`{"input_ids": int32[n], "reference": str}` per row: the prompt to generate from.

    `reference` is the row's `answer_field` text (score it with `exact_match`). Over-long prompts
    keep their last max_length tokens (the end holds the cue to answer), and a leading special
    token (BOS) stays first. Batch them with `Batcher(..., padding_side="left")` for generation.

    Example:
      >>> from jlora.models.llama2c import Llama2cTokenizer
      >>> tok = Llama2cTokenizer(FIXTURES / "tok512.bin")
      >>> ex = encode_prompts([{"question": "2+2?", "answer": "#### 4"}], tok,
      ...                     prompt_template="Question: {question}\\nAnswer:")[0]
      >>> tok.decode(ex["input_ids"]), ex["reference"]
      ('Question: 2+2?\\nAnswer:', '#### 4')
    """
    _check_max_length(max_length)
    prompts = [_format(prompt_template, r, i) for i, r in enumerate(rows)]
    answers = [str(_field(r, answer_field, "answer_field", i)) for i, r in enumerate(rows)]
    special = _special_ids(tokenizer)
    out = []
    for ids, answer in zip(_tokenize(tokenizer, prompts), answers, strict=True):
        if len(ids) > max_length:
            ids = ids[:1] + ids[-(max_length - 1) :] if ids[0] in special else ids[-max_length:]
        out.append({"input_ids": np.asarray(ids, np.int32), "reference": answer})
    return out
