"""Small transformers written the way public JAX codebases write theirs, which jlora did not
adapt in any way: tests run jlora on them untouched.

- `ScannedDecoder` (Linen), in the style of MaxText / Gemma's reference code: layers under
  `nn.scan`, query as a Gemma-style `nn.Einsum("BTD,NDH->BTNH")` with a `(heads, d_model,
  head_dim)` kernel, key / value as `nn.DenseGeneral((heads, head_dim))`, the output projection
  as `nn.DenseGeneral(axis=(-2, -1))`, the MLP as `nn.Dense`.
- `NnxDecoder` (NNX), in the style of tunix's / bonsai's model folders: `nnx.Einsum` query and
  output projections, `nnx.LinearGeneral` key / value, `nnx.Linear` MLP, and its layers either a
  Python list or stacked by `nnx.vmap` and run by `nnx.scan`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, D, HEADS, HEAD_DIM, FF, LAYERS = 40, 16, 2, 8, 24, 3


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention over (B, T, N, H) queries, keys and values."""
    t = q.shape[1]
    w = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    w = jnp.where(jnp.tril(jnp.ones((t, t), bool)), w, -1e9)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(w, axis=-1), v)


# --------------------------------------------------------------------------------------- Linen


class LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        h = nn.RMSNorm(name="pre_attention_norm")(x)
        q = nn.Einsum((HEADS, D, HEAD_DIM), "BTD,NDH->BTNH", name="q_einsum")(h)
        k = nn.DenseGeneral((HEADS, HEAD_DIM), name="key")(h)
        v = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name="value")(h)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(_attend(q, k, v))
        h = nn.RMSNorm(name="pre_ffw_norm")(x)
        h = jax.nn.gelu(nn.Dense(FF, name="wi")(h))
        return x + nn.Dense(D, use_bias=False, name="wo")(h), None


class ScannedDecoder(nn.Module):
    scan: bool = True

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(VOCAB, D, name="embed")
        x = embed(ids)
        if self.scan:
            layers = nn.scan(
                LinenLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=LAYERS,
            )(name="layers")
            x, _ = layers(x, None)
        else:
            for i in range(LAYERS):
                x, _ = LinenLayer(name=f"layer_{i}")(x, None)
        return embed.attend(nn.RMSNorm(name="final_norm")(x))


# ----------------------------------------------------------------------------------------- NNX


class NnxLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.pre_attention_norm = nnx.RMSNorm(D, rngs=rngs)
        self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (HEADS, D, HEAD_DIM), rngs=rngs)
        self.key = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.value = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, D), rngs=rngs)
        self.pre_ffw_norm = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, FF, rngs=rngs)
        self.down = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.pre_attention_norm(x)
        q, k, v = self.q_einsum(h), self.key(h), self.value(h)
        x = x + self.attn_vec_einsum(_attend(q, k, v))
        return x + self.down(jax.nn.gelu(self.up(self.pre_ffw_norm(x))))


class NnxDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, scan: bool = False) -> None:
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.scan = scan
        if scan:

            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs: nnx.Rngs) -> NnxLayer:
                return NnxLayer(rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([NnxLayer(rngs) for _ in range(LAYERS)])
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        if self.scan:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x: jax.Array, layer: NnxLayer) -> jax.Array:
                return layer(x)

            x = run(x, self.layers)
        else:
            for layer in self.layers:
                x = layer(x)
        return self.embed.attend(self.final_norm(x))
