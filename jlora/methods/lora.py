"""LoRA (Hu et al. 2021): ΔK = s · A @ B with A random and B = 0 (output unchanged at init).

A ~ Kaiming-uniform on (d_in, r) by default, or N(0, σ = 1/r) with `lora_init="gaussian"` (as
PEFT's "gaussian" init). rsLoRA changes only the scale (alpha / √r, `AdapterConfig.rslora`).

Example:
  >>> import jax.numpy as jnp, jlora
  >>> cfg = jlora.AdapterConfig(method="lora", rank=2, lora_init="gaussian")
  >>> _, ad = jlora.init(cfg, {"q": {"kernel": jnp.ones((6, 4))}}, 0)
  >>> cfg.options, ad["q/kernel"].params["B"].shape
  (LoraOptions(init='gaussian'), (2, 4))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora import validation as v
from jlora.methods.base import (
    AdapterSpec,
    Leaves,
    Method,
    Options,
    kaiming_uniform,
    per_matrix,
    register,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraOptions(Options):
    """Options of `lora` (and of methods built on its init)."""

    prefix = "lora"
    # A's init: "kaiming" (U(±1/√d_in), PyTorch's Linear) or "gaussian" (N(0, 1/r²), as PEFT).
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if not v.is_text(self.init, ("kaiming", "gaussian")):
            v.fail(self._flat("init"), self.init, "'kaiming' or 'gaussian'")


def random_a(key: jax.Array, d_in: int, r: int, kind: str) -> jax.Array:
    """LoRA's A: Kaiming-uniform, or Gaussian with standard deviation 1/r."""
    if kind == "gaussian":
        return jax.random.normal(key, (d_in, r), jnp.float32) / r
    return kaiming_uniform(key, d_in, r)


class Lora(Method):
    """LoRA: trainable A (random) and B (zero)."""

    name = "lora"
    options_class = LoraOptions

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        r, kind = spec.rank, spec.options.init
        A = per_matrix(lambda k: random_a(k, spec.d_in, r, kind), spec.stack, key)
        return {"A": A, "B": jnp.zeros((*spec.stack, r, spec.d_out), jnp.float32)}


register(Lora())
