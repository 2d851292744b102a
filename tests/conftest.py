"""Shared fixtures: a small Linen transformer block and parameter pytrees with stacked kernels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Every method with the options that change its algorithm, as AdapterConfig keyword sets.
VARIANTS = {
    "lora": dict(method="lora"),
    "lora_gaussian_rs": dict(method="lora", lora_init="gaussian", rslora=True),
    "pissa": dict(method="pissa"),
    "pissa_rand": dict(method="pissa", pissa_niter=4),
    "slora": dict(method="slora"),
    "nlora": dict(method="nlora"),
    "nlora_pinv": dict(method="nlora", nlora_core="pinv"),
    "nlora_random": dict(method="nlora", nlora_core="pinv", nlora_sampling="random"),
    "inttune": dict(method="inttune"),
    "nola": dict(method="nola", nola_num_basis=(16, 12)),
    "nola_cache": dict(method="nola", nola_num_basis=(16, 12), nola_basis="cache"),
    "gora": dict(method="gora", gora_rank_range=(2, 8)),
}
# Variants whose output is unchanged at init: all but the paper-faithful nlora/inttune (which
# move by s·C·U·R) and gora (whose B init is one compressed gradient step).
EXACT_AT_INIT = [v for v in VARIANTS if v not in ("nlora", "inttune", "gora")]


class Block(nn.Module):
    """Pre-norm transformer block: 4-head attention (q, k, v, o) and an MLP 32 → 48 → 32."""

    d_model: int = 32
    heads: int = 4
    d_ff: int = 48

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(d, name=n)(h) for n in ("query", "key", "value"))
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // self.heads)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(o)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.DenseGeneral(self.d_ff, name="up")(h)
        return x + nn.Dense(d, use_bias=False, name="down")(jax.nn.gelu(h))


class Tiny(nn.Module):
    """Embedding → two blocks → vocabulary projection."""

    vocab: int = 40

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, 32, name="embed")(ids)
        for i in range(2):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


@pytest.fixture(scope="session")
def tiny():
    model = Tiny()
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)
    params = model.init(jax.random.key(0), ids)["params"]
    # Pretrained-like weights: larger than Flax's default init so adapters matter.
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 2 else p, params)
    return model, params, ids


@pytest.fixture(scope="session")
def stacked_params():
    """A plain pytree: a 2-D kernel with d_in != d_out and a (3, 24, 40) stacked kernel."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    return {
        "proj": {"kernel": jax.random.normal(k1, (24, 40)), "bias": jnp.zeros(40)},
        "layers": {"mlp": {"kernel": jax.random.normal(k2, (3, 40, 24))}},
        "embed": {"embedding": jax.random.normal(k3, (10, 24))},
    }


def make_config(variant: str, **overrides):
    import jlora

    kw = dict(VARIANTS[variant])
    kw.setdefault("rank", 4)
    kw.update(overrides)
    return jlora.AdapterConfig(**kw)


def fake_grads(params, seed: int = 3):
    """Random 'pre-pass gradients' for every kernel (GoRA's init only needs their values)."""
    from jlora import targets

    flat = {p: v for p, v in targets.flatten(params).items() if targets.is_kernel(p, v)}
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return {p: jax.random.normal(k, v.shape) for k, (p, v) in zip(keys, flat.items(), strict=True)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def init_variant(variant: str, params, key=0, **overrides):
    """`jlora.init` for a variant (GoRA gets `fake_grads`)."""
    import jlora

    cfg = make_config(variant, **overrides)
    grads = fake_grads(params) if cfg.method == "gora" else None
    return jlora.init(cfg, params, jax.random.key(key), grads=grads)
