"""Llama-family decoder in Flax Linen, laid out like Hugging Face's `LlamaForCausalLM`.

One module covers Llama 2/3 (llama3 RoPE scaling), Mistral (sliding window), Qwen2/2.5 (q/k/v
bias), Qwen3 (per-head q/k RMSNorm) and SmolLM2 / stories260K (tied embeddings): these differ
only in the flags of `LlamaConfig`, and their checkpoints share the same tensor names.

Parameter paths follow the checkpoint names, so adapter targets read naturally:
`model/layers_3/self_attn/q_proj/kernel`, `model/layers_3/mlp/gate_proj/kernel`, ... Every
projection is its own `nn.Dense` (never fused), which `jlora.inject` adapts factored.

RoPE uses Hugging Face's rotate-half convention; checkpoints in Meta's interleaved convention
(llama2.c, GGUF) are permuted on load, as transformers' converters do.

Calling convention: `apply({"params": p}, input_ids, attention_mask=None)` -> float32 logits
`(batch, seq, vocab)`. With `cache=` (see `init_cache`) it also takes the slot of the first new
token in the cache and returns `(logits, cache)`; `jlora.models.generate` drives that.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.models.llama import LlamaConfig, Llama
  >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
  ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = Llama(cfg).init(jax.random.key(0), ids)["params"]
  >>> Llama(cfg).apply({"params": params}, ids).shape
  (2, 5, 32)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.remat import wrap
from jlora.sharding import Rule

family = "llama"

Cache = list[dict[str, jax.Array]]


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"LlamaConfig.{field}={value!r}: expected {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Context-extension of RoPE frequencies (transformers' `rope_parameters`)."""

    # "linear" divides every frequency by `factor`; "llama3" (Llama 3.1+) divides only the low
    # frequencies and interpolates the band between `low_freq_factor` and `high_freq_factor`.
    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            _fail("rope_scaling.rope_type", self.rope_type, "'linear' or 'llama3'")
        if not self.factor > 0:
            _fail("rope_scaling.factor", self.factor, "a number > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            _fail("rope_scaling.high_freq_factor", self.high_freq_factor, "> low_freq_factor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (names as in transformers' `LlamaConfig`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # Grouped-query attention: fewer key/value heads than query heads (None = as many).
    num_key_value_heads: int | None = None
    # Per-head width; None = hidden_size // num_attention_heads (Qwen3 sets it explicitly).
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Output projection shares the token embedding (SmolLM2, stories260K, small Qwen).
    tie_word_embeddings: bool = False
    # Biases on the q/k/v projections (Qwen2; Llama's `attention_bias` sets this and o_bias).
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    qk_norm: bool = False
    # Keys further back than this many positions are masked (Mistral); None = full attention.
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    # transformers model_type this config came from ("llama", "mistral", "qwen2", "qwen3").
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        kv = self.kv_heads
        if kv < 1 or self.num_attention_heads % kv:
            _fail(
                "num_key_value_heads",
                kv,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            _fail(
                "head_dim",
                None,
                "set explicitly when num_attention_heads does not divide hidden_size",
            )
        if self.dim_head % 2:
            _fail("head_dim", self.dim_head, "an even number (RoPE rotates pairs)")
        if self.sliding_window is not None and self.sliding_window < 1:
            _fail("sliding_window", self.sliding_window, "an integer >= 1 or None")
        if self.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            _fail("model_type", self.model_type, "one of 'llama', 'mistral', 'qwen2', 'qwen3'")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * x32.astype(x.dtype)).astype(x.dtype)


def inv_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """RoPE inverse frequencies, with transformers' linear / llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(
    positions: jax.Array, dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (..., seq, dim) in the rotate-half layout."""
    freqs = positions[..., None].astype(jnp.float32) * inv_frequencies(dim, theta, scaling)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (batch, seq, heads, dim); cos/sin: (batch, seq, dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: dict[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        b, t, _ = x.shape
        hd, nh, nkv = c.dim_head, c.num_attention_heads, c.kv_heads

        def dense(features: int, name: str, bias: bool) -> nn.Dense:
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)

        q = dense(nh * hd, "q_proj", c.attention_bias)(x).reshape(b, t, nh, hd)
        k = dense(nkv * hd, "k_proj", c.attention_bias)(x).reshape(b, t, nkv, hd)
        v = dense(nkv * hd, "v_proj", c.attention_bias)(x).reshape(b, t, nkv, hd)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        q = q.reshape(b, t, nkv, nh // nkv, hd)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / jnp.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, nh * hd)
        return dense(c.hidden_size, "o_proj", c.o_bias)(out), cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype, name=name)

        gate = dense(c.intermediate_size, "gate_proj")(x)
        up = dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, name="input_layernorm")(x)
        h, cache = Attention(self.config, self.dtype, name="self_attn")(
            h, cos, sin, mask, cache, cache_index
        )
        x = x + h
        h = RMSNorm(eps, name="post_attention_layernorm")(x)
        return x + MLP(self.config, self.dtype, name="mlp")(h), cache


def attention_mask_4d(
    query_slots: jax.Array,
    key_slots: jax.Array,
    key_valid: jax.Array | None,
    sliding_window: int | None,
) -> jax.Array:
    """(batch, q, k) boolean mask: causal by slot, padding, and the sliding window."""
    mask = key_slots[None, None, :] <= query_slots[None, :, None]
    if sliding_window is not None:
        mask = mask & (query_slots[None, :, None] - key_slots[None, None, :] < sliding_window)
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[:, None, :]
    return mask


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm. Returns the final hidden states, or, with
    `tie_word_embeddings`, the logits over the shared embedding (the embedding lives here)."""

    config: LlamaConfig
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
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids)
        if cache is None:
            query_slots = key_slots = jnp.arange(t)
        else:
            query_slots = cache_index + jnp.arange(t)
            key_slots = jnp.arange(cache[0]["k"].shape[1])
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (b, t))
        cos, sin = rope_tables(positions, c.dim_head, c.rope_theta, c.rope_scaling)
        mask = attention_mask_4d(query_slots, key_slots, attention_mask, c.sliding_window)
        new_cache = [] if cache is not None else None
        layer_class = wrap(DecoderLayer, self.remat, "Llama.remat")
        if self.scan_layers:
            if cache is not None:
                raise ValueError(
                    "Llama(scan_layers=True) has no key/value cache: generate with "
                    "scan_layers=False on jlora.models.scan.unstack_layers(params)"
                )
            # One compiled layer, its parameters stacked (`jlora.models.scan`).
            scanned = nn.scan(
                layer_class,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers,
            )
            x, _ = scanned(c, self.dtype, name="layers")(x, cos, sin, mask)
        for i in range(0 if self.scan_layers else c.num_hidden_layers):
            layer = layer_class(c, self.dtype, name=f"layers_{i}")
            x, layer_cache = layer(
                x, cos, sin, mask, None if cache is None else cache[i], cache_index
            )
            if new_cache is not None:
                new_cache.append(layer_cache)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_word_embeddings:
            return embed.attend(x).astype(jnp.float32), new_cache
        return x, new_cache


class Llama(nn.Module):
    """Causal LM: `apply({"params": p}, input_ids, attention_mask=None)` -> logits (b, t, vocab).

    `attention_mask` (batch, seq) marks real tokens (1) and padding (0). `positions` overrides
    the RoPE positions (default: the slot index, as transformers' forward without
    `position_ids`). With `cache` (from `init_cache`), `attention_mask` covers the whole cache
    and `cache_index` is the slot of `input_ids[:, 0]`; the call returns `(logits, cache)`.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    # Per-layer rematerialisation: "none", "full" or "dots" (see `jlora.models.remat`).
    remat: str = "none"
    # Run the decoder layers under `nn.scan` (`model/layers/...`, stacked; `jlora.models.scan`):
    # one layer compiled instead of all. No key/value cache (generation) in this mode.
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
        h, new_cache = LlamaModel(
            self.config, self.dtype, self.remat, self.scan_layers, name="model"
        )(input_ids, attention_mask, positions, cache, jnp.asarray(cache_index, jnp.int32))
        if not self.config.tie_word_embeddings:
            lm_head = nn.Dense(
                self.config.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head"
            )
            h = lm_head(h).astype(jnp.float32)
        return h if cache is None else (h, new_cache)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
        """Empty key/value cache: per layer `{"k", "v"}`, (batch, length, kv_heads, head_dim)."""
        c = self.config
        shape = (batch, length, c.kv_heads, c.dim_head)
        dtype = dtype or self.dtype
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(c.num_hidden_layers)
        ]


# Target presets (regexes over '/'-joined kernel paths; see `jlora.models.preset`).
PRESETS = {
    "attention": r"model/layers(_\d+)?/self_attn/(q|k|v|o)_proj/kernel",
    "all-linear": r"model/layers(_\d+)?/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel",
}


# Mesh layouts of the parameters (`jlora.sharding`): FSDP splits one axis of every large kernel
# over `fsdp`; tensor parallelism (Megatron) splits q/k/v/gate/up by output (heads, MLP hidden)
# and o/down by input over `tensor`, so each block ends in one all-reduce. Norms are replicated.
_L = r"model/layers(_\d+)?/"
SHARDING = (
    Rule(r"model/embed_tokens/embedding", ("tensor", "fsdp")),
    Rule(rf"{_L}(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/kernel", ("fsdp", "tensor")),
    Rule(rf"{_L}self_attn/(q|k|v)_proj/bias", ("tensor",)),
    Rule(rf"{_L}(self_attn/o_proj|mlp/down_proj)/kernel", ("tensor", "fsdp")),
    Rule(r"lm_head/kernel", ("fsdp", "tensor")),
)
