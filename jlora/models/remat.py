"""Per-layer rematerialisation (activation checkpointing) for the model families.

A model's `remat` field picks what each transformer layer keeps for the backward pass:

- `"none"`: every activation (fastest, most memory);
- `"full"`: only the layer's input; the whole layer is recomputed in the backward pass
  (`jax.checkpoint_policies.nothing_saveable`);
- `"dots"`: the outputs of matmuls without batch dimensions (the projections, adapters
  included) are kept, everything else (norms, activations, attention scores) is recomputed
  (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).

Remat changes memory and time only: parameter paths (`model/layers_3/...`), adapter injection and
the numbers are the same (gradients equal the non-remat ones up to float reassociation).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.llama import Llama, LlamaConfig
  >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
  ...                   num_hidden_layers=2, num_attention_heads=2)
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> p = Llama(cfg).init(jax.random.key(0), ids)["params"]
  >>> loss = lambda m, p: m.apply({"params": p}, ids).sum()
  >>> g0 = jax.grad(lambda p: loss(Llama(cfg), p))(p)
  >>> g1 = jax.grad(lambda p: loss(Llama(cfg, remat="full"), p))(p)
  >>> bool(jax.tree.reduce(max, jax.tree.map(lambda a, b: abs(a - b).max(), g0, g1)) < 1e-5)
  True
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

__all__ = ["REMAT", "check", "wrap"]

# Name -> checkpoint policy (None: no remat).
REMAT: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check(field: str, value: Any) -> None:
    """Raises ValueError unless `value` names a remat policy (`field` names it in the error)."""
    if not (isinstance(value, str) and value in REMAT):
        raise ValueError(f"{field}={value!r} is invalid: expected one of {sorted(REMAT)}")


def wrap(layer: type[nn.Module], remat: str, field: str = "remat") -> type[nn.Module]:
    """`layer` itself for "none", else `nn.remat(layer)` with the named policy."""
    check(field, remat)
    if remat == "none":
        return layer
    return nn.remat(layer, policy=REMAT[remat], prevent_cse=True)
