"""LoRA (Hu et al. 2021): ΔK = s · A @ B with A random and B = 0 (output unchanged at init).

A ~ Kaiming-uniform on (d_in, r) by default, or N(0, σ = 1/r) with `lora_init="gaussian"` (as
PEFT's "gaussian" init). rsLoRA changes only the scale (alpha / √r), see `AdapterConfig.scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import AdapterConfig
from jlora.methods.base import AdapterSpec, Leaves, Method, amb_factors, kaiming_uniform, per_matrix


def random_a(key: jax.Array, d_in: int, r: int, kind: str) -> jax.Array:
    """LoRA's A: Kaiming-uniform, or Gaussian with standard deviation 1/r."""
    if kind == "gaussian":
        return jax.random.normal(key, (d_in, r), jnp.float32) / r
    return kaiming_uniform(key, d_in, r)


def _init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    r = spec.rank
    A = per_matrix(lambda k: random_a(k, spec.d_in, r, config.lora_init), spec.stack, key)
    return {"A": A, "B": jnp.zeros((*spec.stack, r, spec.d_out), jnp.float32)}


LORA = Method(name="lora", init=_init, factors=amb_factors, trainable=lambda c: ("A", "B"))
