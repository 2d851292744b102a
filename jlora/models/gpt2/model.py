"""GPT-2 decoder in Flax Linen, laid out like Hugging Face's `GPT2LMHeadModel`.

Parameter paths follow the checkpoint names, so adapter targets read naturally:
`transformer/h_3/attn/c_attn/kernel`, `transformer/h_3/mlp/c_fc/kernel`, ... Every projection is
its own `nn.Dense`, which `jlora.inject` adapts factored. GPT-2's `Conv1D` stores its weight as
`(in, out)`, which is already Flax's kernel layout: nothing is transposed on load or save.

The query, key and value projections are ONE fused matrix, `attn/c_attn`, `d -> 3d` (outputs
`[q | k | v]`, each `d` wide), and jlora adapts it as one matrix, as PEFT does (PEFT targets the
module `c_attn` and, with `fan_in_fan_out=True`, sees its weight transposed to `(out, in) =
(3d, d)`). A rank-r adapter on `c_attn` is therefore one `d x 3d` low-rank update, not three:

- NLoRA / IntTune's "first r rows and columns" (`jlora.linalg.nystrom_first`: `K[:, :r]`,
  `K[:r, :r]`, `K[:r, :]` of the `(in, out)` kernel) take the first r OUTPUT features of the
  fused matrix, i.e. r query features (keys and values contribute no sampled column), and the
  first r input features.
- microsoft/LoRA's and NOLA's GPT-2 code instead use loralib's `MergedLinear(enable_lora=[True,
  False, True])`: separate rank-r adapters on the q and v blocks, k untouched. For LoRA the
  trainable count is the same (`r·(d + 3d) = 2·r·(d + d)`), but jlora's (and PEFT's) update
  is not restricted to the q and v blocks: it also moves the keys, and its q and v parts share
  one rank-r input subspace.

`PRESETS["attention"]` is `c_attn` alone (what the LoRA / NOLA GPT-2 E2E recipes adapt, and
PEFT's default LoRA target for gpt2); "all-linear" adds `attn/c_proj`, `mlp/c_fc` and `mlp/c_proj`.

Positions are learned (`wpe`, `n_positions` of them); the head shares the token embedding
(`wte.attend`) unless `tie_word_embeddings=False` (then `lm_head/kernel`, no bias). No dropout
(inference and deterministic fine-tuning).

Calling convention (that of `jlora.models.llama.Llama`): `apply({"params": p}, input_ids,
attention_mask=None)` -> float32 logits `(batch, seq, vocab)`. `positions` overrides the
position ids (default: the slot index; `jlora.models.generate` passes the cumulative count of
real tokens for left padding, as transformers' `generate` does). With `cache=` (see
`init_cache`) it also takes the slot of the first new token in the cache and returns
`(logits, cache)`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.gpt2 import GPT2, GPT2Config
  >>> cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=4)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = GPT2(cfg).init(jax.random.key(0), ids)["params"]
  >>> GPT2(cfg).apply({"params": params}, ids).shape
  (2, 5, 32)
  >>> params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"].shape  # (d, 3d): [q | k | v]
  (16, 48)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.remat import wrap
from jlora.sharding import Rule

family = "gpt2"

Cache = list[dict[str, jax.Array]]

# transformers' `ACT2FN` names (those GPT-2-style checkpoints use) and their JAX equivalents.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_accurate": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"GPT2Config.{field}={value!r}: expected {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Architecture of a GPT-2 decoder (names and defaults as in transformers' `GPT2Config`:
    the defaults are GPT-2 small's)."""

    vocab_size: int = 50257
    # Learned positions: the longest sequence (prompt + generated tokens) the model takes.
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    # MLP width; None = 4 * n_embd.
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    # Scores divided by sqrt(head_dim) (True in every released GPT-2).
    scale_attn_weights: bool = True
    # Scores further divided by (layer index + 1).
    scale_attn_by_inverse_layer_idx: bool = False
    # transformers' float32 upcast of the scores under mixed precision: jlora always computes
    # scores and softmax in float32, so the flag changes nothing here (kept for config.json).
    reorder_and_upcast_attn: bool = False
    # The head shares the token embedding (`wte.attend`); False: a separate `lm_head`.
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "an integer >= 1")
        if self.n_embd % self.n_head:
            _fail("n_head", self.n_head, f"a divisor of n_embd={self.n_embd}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            _fail("n_inner", self.n_inner, "None (4 * n_embd) or an integer >= 1")
        if self.activation_function not in ACTIVATIONS:
            _fail("activation_function", self.activation_function, f"one of {tuple(ACTIVATIONS)}")
        if not self.layer_norm_epsilon > 0:
            _fail("layer_norm_epsilon", self.layer_norm_epsilon, "a number > 0")
        if self.model_type != "gpt2":
            _fail("model_type", self.model_type, "'gpt2'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd


def _layer_norm(c: GPT2Config, dtype: Any, name: str) -> nn.LayerNorm:
    # float32 statistics and the two-pass variance, as PyTorch computes them.
    return nn.LayerNorm(c.layer_norm_epsilon, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        layer_index: Any,
        cache: dict[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        b, t, d = x.shape
        nh, hd = c.n_head, c.head_dim
        # One fused projection d -> 3d, outputs [q | k | v] (transformers' `split(d, dim=2)`).
        qkv = nn.Dense(3 * d, dtype=self.dtype, name="c_attn")(x)
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, nh, hd) for i in range(3))
        if cache is not None:
            # Write the new keys/values at their slots; attend over the whole cache (the mask
            # hides empty and padded slots).
            k = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0)
            )
            cache = {"k": k, "v": v}
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scale = hd**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:  # a Python int unrolled, traced under nn.scan
            scale = scale / (layer_index + 1)
        scores = jnp.where(mask[:, None, :, :], scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, name="c_proj")(out), cache


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.Dense(c.inner_dim, dtype=self.dtype, name="c_fc")(x)
        h = ACTIVATIONS[c.activation_function](h)
        return nn.Dense(c.n_embd, dtype=self.dtype, name="c_proj")(h)


class Block(nn.Module):
    """Pre-norm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`; returns `(x, cache)`."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, layer_index, cache=None, cache_index=None):
        c = self.config
        h, cache = Attention(c, self.dtype, name="attn")(
            _layer_norm(c, self.dtype, "ln_1")(x), mask, layer_index, cache, cache_index
        )
        x = x + h
        x = x + MLP(c, self.dtype, name="mlp")(_layer_norm(c, self.dtype, "ln_2")(x))
        return x, cache


def attention_mask_3d(
    query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array | None
) -> jax.Array:
    """(batch, q, k) boolean mask: causal by slot, and padding."""
    mask = key_slots[None, None, :] <= query_slots[None, :, None]
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[:, None, :]
    return mask


class GPT2Model(nn.Module):
    """Embeddings, blocks and final norm. Returns the final hidden states, or, with
    `tie_word_embeddings`, the logits over the shared embedding (the embedding lives here)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        c = self.config
        b, t = input_ids.shape
        wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype, name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype, name="wpe")
        if cache is None:
            query_slots = key_slots = jnp.arange(t)
        else:
            query_slots = cache_index + jnp.arange(t)
            key_slots = jnp.arange(cache[0]["k"].shape[1])
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (b, t))
        x = wte(input_ids) + wpe(positions)
        mask = attention_mask_3d(query_slots, key_slots, attention_mask)
        new_cache = [] if cache is not None else None
        block_class = wrap(Block, self.remat, "GPT2.remat")
        if self.scan_layers:
            if cache is not None:
                raise ValueError(
                    "GPT2(scan_layers=True) has no key/value cache: generate with "
                    "scan_layers=False on jlora.models.scan.unstack_layers(params, "
                    "'transformer', 'h')"
                )
            # One compiled block, its parameters stacked (`jlora.models.scan`); the layer index
            # (for `scale_attn_by_inverse_layer_idx`) is scanned over.
            scanned = nn.scan(
                block_class,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=c.n_layer,
            )
            x, _ = scanned(c, self.dtype, name="h")(x, mask, jnp.arange(c.n_layer))
        for i in range(0 if self.scan_layers else c.n_layer):
            block = block_class(c, self.dtype, name=f"h_{i}")
            x, layer_cache = block(x, mask, i, None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)
        x = _layer_norm(c, self.dtype, "ln_f")(x)
        if c.tie_word_embeddings:
            return wte.attend(x).astype(jnp.float32), new_cache
        return x, new_cache


class GPT2(nn.Module):
    """Causal LM: `apply({"params": p}, input_ids, attention_mask=None)` -> logits (b, t, vocab).

    `attention_mask` (batch, seq) marks real tokens (1) and padding (0). `positions` overrides
    the position ids (default: the slot index, as transformers' forward without
    `position_ids`); they must stay below `n_positions`. With `cache` (from `init_cache`),
    `attention_mask` covers the whole cache and `cache_index` is the slot of `input_ids[:, 0]`;
    the call returns `(logits, cache)`.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    # Per-layer rematerialisation: "none", "full" or "dots" (see `jlora.models.remat`).
    remat: str = "none"
    # Run the blocks under `nn.scan` (`transformer/h/...`, stacked; `jlora.models.scan`): one
    # block compiled instead of all. No key/value cache (generation) in this mode.
    scan_layers: bool = False
    family = family

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        h, new_cache = GPT2Model(
            self.config, self.dtype, self.remat, self.scan_layers, name="transformer"
        )(input_ids, attention_mask, positions, cache, jnp.asarray(cache_index, jnp.int32))
        if not self.config.tie_word_embeddings:
            lm_head = nn.Dense(
                self.config.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head"
            )
            h = lm_head(h).astype(jnp.float32)
        return h if cache is None else (h, new_cache)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
        """Empty key/value cache: per layer `{"k", "v"}`, (batch, length, n_head, head_dim)."""
        c = self.config
        shape = (batch, length, c.n_head, c.head_dim)
        dtype = dtype or self.dtype
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(c.n_layer)
        ]


# Target presets (regexes over '/'-joined kernel paths, unrolled `h_N` or scanned `h`; see
# `jlora.models.preset`). "attention" is the fused q/k/v projection alone (see the module
# docstring), what the LoRA / NOLA GPT-2 recipes and PEFT target.
_L = r"transformer/h(_\d+)?/"
PRESETS = {
    "attention": rf"{_L}attn/c_attn/kernel",
    "all-linear": rf"{_L}(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel",
}


# Mesh layouts of the parameters (`jlora.sharding`), as Llama's: FSDP splits one axis of every
# large kernel over `fsdp`; tensor parallelism splits c_attn and c_fc by output and the two
# c_proj by input over `tensor`, so each block ends in one all-reduce. (c_attn's output axis is
# [q | k | v]: a `tensor` shard is a contiguous run of it, not whole heads of each of q, k and
# v; XLA reshards at the split, correct but not Megatron's head-aligned layout.) Norms and the
# position embedding are replicated.
SHARDING = (
    Rule(r"transformer/wte/embedding", ("tensor", "fsdp")),
    Rule(rf"{_L}(attn/c_attn|mlp/c_fc)/kernel", ("fsdp", "tensor")),
    Rule(rf"{_L}(attn/c_attn|mlp/c_fc)/bias", ("tensor",)),
    Rule(rf"{_L}(attn/c_proj|mlp/c_proj)/kernel", ("tensor", "fsdp")),
    Rule(r"lm_head/kernel", ("fsdp", "tensor")),
)
