"""The decoder calls that greedy decoding, sampling and both beam searches share: one forward
pass on a key/value cache (`cached_forward`) and the prompt pass that fills it (`prefill`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.llama import LlamaConfig, Llama
  >>> model = Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
  ...                           num_hidden_layers=1, num_attention_heads=2))
  >>> ids = jnp.array([[0, 5, 6]]); mask = jnp.array([[0, 1, 1]])
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> forward, last, cache, valid, pos = prefill(model, params, {}, ids, mask, 5)
  >>> last.shape, valid.tolist(), pos.tolist()
  ((1, 32), [[False, True, True, False, False]], [2])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora.linen.inject import inject

__all__ = ["cached_forward", "prefill"]


def cached_forward(model: Any, params: Any, adapters: Any) -> Any:
    """`forward(ids, valid, positions, cache, index) -> (logits, cache)`: one decoder call on the
    key/value cache, with `adapters` on the factored path."""

    def forward(ids, valid, positions, cache, index):
        with inject(adapters):
            return model.apply(
                {"params": params}, ids, valid, positions=positions, cache=cache, cache_index=index
            )

    return forward


def prefill(
    model: Any,
    params: Any,
    adapters: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    length: int,
) -> tuple[Any, jax.Array, Any, jax.Array, jax.Array]:
    """One pass over left-padded prompts into a fresh key/value cache of `length` slots:
    `(forward, last logits, cache, valid slots, position of each row's next token)`, with
    `forward` from `cached_forward` and positions counting real tokens (transformers')."""
    rows, t = input_ids.shape
    mask = attention_mask.astype(bool)
    valid = jnp.zeros((rows, length), bool).at[:, :t].set(mask)
    positions = jnp.where(mask, jnp.cumsum(mask, axis=-1) - 1, 0)
    forward = cached_forward(model, params, adapters)
    logits, cache = forward(input_ids, valid, positions, model.init_cache(rows, length), 0)
    return forward, logits[:, -1], cache, valid, jnp.sum(mask, axis=-1).astype(jnp.int32)
