"""Llama-family decoder in Flax Linen, laid out like Hugging Face's `LlamaForCausalLM`.

Parameter paths follow the checkpoint names, so adapter targets read naturally:
`model/layers_3/self_attn/q_proj/kernel`, `model/layers_3/mlp/gate_proj/kernel`, ... Every
projection is its own `nn.Dense` (never fused), which `jlora.inject` adapts factored.

RoPE uses Hugging Face's rotate-half convention; checkpoints in Meta's interleaved convention
(llama2.c) are permuted on load, as transformers' converters do.

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    # Per-head width; None = hidden_size // num_attention_heads.
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Output projection shares the token embedding (SmolLM2, stories260K).
    tie_word_embeddings: bool = False
    # Biases on q/k/v projections (Qwen2).
    attention_bias: bool = False
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}: expected >= 1")
        kv = self.kv_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads={kv} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )

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


def rope_tables(positions: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (..., seq, dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
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
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        hd, nh, nkv = c.dim_head, c.num_attention_heads, c.kv_heads

        def dense(features: int, name: str, bias: bool) -> nn.Dense:
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)

        q = dense(nh * hd, "q_proj", c.attention_bias)(x).reshape(b, t, nh, hd)
        k = dense(nkv * hd, "k_proj", c.attention_bias)(x).reshape(b, t, nkv, hd)
        v = dense(nkv * hd, "v_proj", c.attention_bias)(x).reshape(b, t, nkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(b, t, nkv, nh // nkv, hd)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / jnp.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, nh * hd)
        return dense(c.hidden_size, "o_proj", False)(out)


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=False, dtype=self.dtype, name="gate_proj")(x)
        up = nn.Dense(c.intermediate_size, use_bias=False, dtype=self.dtype, name="up_proj")(x)
        down = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, name="down_proj")
        return down(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, name="input_layernorm")(x)
        x = x + Attention(self.config, self.dtype, name="self_attn")(h, cos, sin, mask)
        h = RMSNorm(eps, name="post_attention_layernorm")(x)
        return x + MLP(self.config, self.dtype, name="mlp")(h)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm. Returns the final hidden states, or, with
    `tie_word_embeddings`, the logits over the shared embedding (the embedding lives here)."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        b, t = input_ids.shape
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rope_tables(positions, c.dim_head, c.rope_theta)
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        for i in range(c.num_hidden_layers):
            x = DecoderLayer(c, self.dtype, name=f"layers_{i}")(x, cos, sin, mask)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_word_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return x


class Llama(nn.Module):
    """Causal LM: `apply({"params": p}, input_ids, attention_mask=None)` -> logits (b, t, vocab)."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        h = LlamaModel(self.config, self.dtype, name="model")(input_ids, attention_mask)
        if self.config.tie_word_embeddings:
            return h  # LlamaModel already projected onto the shared embedding
        lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")
        return lm_head(h).astype(jnp.float32)
