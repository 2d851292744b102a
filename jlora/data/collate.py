"""Padding encoded examples into fixed-shape numpy batches, and next-token targets.

An example is a dict with `input_ids` (int[n]) and optionally `label` (int) and `loss_mask`
(bool[n], aligned with `input_ids`: see `jlora.data.tasks.encode_sft`). `collate` pads a list
of them to `[batch_size, length]`:

- `input_ids` int32 [B, L] (pad_id in padding), `attention_mask` int32 [B, L] (1 on tokens);
- `label` int32 [B] and/or `loss_mask` bool [B, L] (False in padding) when the examples have them;
- `weight` float32 [B]: 1 for real rows, 0 for dummy rows that fill a short batch up to
  batch_size (copies of the batch's first row, with `loss_mask` all False);
- `index` int32 [B]: each row's position in the caller's example list, -1 for dummy rows.

Other keys (e.g. the `reference` strings of `encode_prompts`) stay out of the batch; look them
up through `index`.

Example:
  >>> import numpy as np
  >>> b = collate([{"input_ids": np.array([5, 6, 7]), "label": 1}], length=4, batch_size=2)
  >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["weight"].tolist()
  ([[5, 6, 7, 0], [5, 6, 7, 0]], [[1, 1, 1, 0], [1, 1, 1, 0]], [1.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PADDING_SIDES = ("right", "left")


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket length >= n.

    Example:
      >>> bucket_length(40, (32, 64, 128))
      64
    """
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"length {n}: longer than the largest bucket {max(buckets)} of {buckets}")


def collate(
    examples: Sequence[Mapping[str, Any]],
    *,
    length: int,
    batch_size: int | None = None,
    pad_id: int = 0,
    padding_side: str = "right",
    indices: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Examples padded to `[batch_size, length]` (batch_size defaults to len(examples)).

    Example:
      >>> import numpy as np
      >>> ex = {"input_ids": np.array([1, 9]), "loss_mask": np.array([False, True])}
      >>> b = collate([ex], length=3, padding_side="left")
      >>> b["input_ids"].tolist(), b["loss_mask"].tolist()
      ([[0, 1, 9]], [[False, False, True]])
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side {padding_side!r}: expected one of {PADDING_SIDES}")
    n = len(examples)
    batch_size = n if batch_size is None else batch_size
    if not 0 < n <= batch_size:
        raise ValueError(f"examples: {n} rows for batch_size {batch_size}; expected 1 to it")
    indices = list(range(n)) if indices is None else list(indices)
    rows = list(range(n)) + [0] * (batch_size - n)  # dummy rows repeat the first example
    ids = np.full((batch_size, length), pad_id, np.int32)
    attn = np.zeros((batch_size, length), np.int32)
    has_mask = "loss_mask" in examples[0]
    mask = np.zeros((batch_size, length), np.bool_)
    for r, i in enumerate(rows):
        x = np.asarray(examples[i]["input_ids"])
        k = len(x)
        if k > length:
            raise ValueError(f"input_ids of example {indices[i]}: {k} tokens > length {length}")
        cols = slice(0, k) if padding_side == "right" else slice(length - k, length)
        ids[r, cols] = x
        attn[r, cols] = 1
        if has_mask and r < n:
            mask[r, cols] = examples[i]["loss_mask"]
    batch = {"input_ids": ids, "attention_mask": attn}
    if "label" in examples[0]:
        batch["label"] = np.array([examples[i]["label"] for i in rows], np.int32)
    if has_mask:
        batch["loss_mask"] = mask
    batch["weight"] = (np.arange(batch_size) < n).astype(np.float32)
    batch["index"] = np.array([indices[i] for i in range(n)] + [-1] * (batch_size - n), np.int32)
    return batch


def next_token_targets(input_ids: Any, loss_mask: Any) -> tuple[Any, Any]:
    """`(targets, mask)` of the same [B, L] shape for a causal LM's logits at every position.

    `targets[:, t] = input_ids[:, t + 1]` and `mask[:, t] = loss_mask[:, t + 1]`: the logits at
    position t are scored on the next token exactly where that token is an answer token. The last
    column has target 0 and mask False. Works on numpy and jax arrays (inside `jit` too).

    Example:
      >>> import numpy as np
      >>> t, m = next_token_targets(np.array([[1, 5, 6, 2]]), np.array([[0, 0, 1, 1]], bool))
      >>> t.tolist(), m.tolist()
      ([[5, 6, 2, 0]], [[False, True, True, False]])
    """
    xp = np if isinstance(input_ids, np.ndarray) else _jnp()
    targets = xp.concatenate([input_ids[:, 1:], xp.zeros_like(input_ids[:, :1])], axis=1)
    mask = xp.concatenate([loss_mask[:, 1:], xp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, mask


def _jnp() -> Any:
    import jax.numpy as jnp

    return jnp
