"""SLoRA, NLoRA and IntTune (arXiv 2502.14482): ΔK = s · A @ M @ B with an r×r middle matrix M.

- `slora`: A ~ Kaiming-uniform (d_in, r), M ~ U(±1/√r), B = 0; ΔK = 0 at init (only B gets a
  gradient on the first step).
- `nlora` (paper code, the default): `A = K[:, :r]`, `M = K[:r, :r]`, `B = K[:r, :]` with no
  pseudo-inverse and no residual, so the function moves at init by `s · A @ M @ B`.
  Variants: `nlora_core="pinv"` uses the textbook Nyström core and `nlora_sampling="random"`
  Gaussian sketches (`A = K Ω`, `B = Ψᵀ K`); both write the residual into the frozen kernel. Their
  core is `pinv(U) / s`, so `s · A @ M @ B` is exactly the Nyström approximation `C U⁺ R` and the
  frozen kernel keeps the Nyström error (the same normalisation PiSSA applies with 1/√s).
- `inttune`: NLoRA's init with only M trainable (r² numbers per matrix).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora.config import AdapterConfig
from jlora.methods.base import AdapterSpec, Leaves, Method, amb_factors, kaiming_uniform, per_matrix


def _slora_init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    r = spec.rank

    def one(k: jax.Array) -> Leaves:
        ka, km = jax.random.split(k)
        bound = 1.0 / math.sqrt(r)
        return {
            "A": kaiming_uniform(ka, spec.d_in, r),
            "M": jax.random.uniform(km, (r, r), jnp.float32, -bound, bound),
        }

    leaves = per_matrix(one, spec.stack, key)
    leaves["B"] = jnp.zeros((*spec.stack, r, spec.d_out), jnp.float32)
    return leaves


def _nlora_init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    r = spec.rank

    def one(k: jax.Array, W: jax.Array) -> Leaves:
        if config.nlora_sampling == "random":
            C, U, R = linalg.nystrom_sketch(W, r, k)
        else:
            C, U, R = linalg.nystrom_first(W, r)
        if config.nlora_core == "pinv":
            U = linalg.pinv(U, config.nlora_rcond) / jnp.float32(spec.scale)
        return {"A": C, "M": U, "B": R}

    return per_matrix(one, spec.stack, key, K)


def _nlora_residual(config: AdapterConfig) -> bool:
    return config.nlora_core == "pinv" or config.nlora_sampling == "random"


SLORA = Method(
    name="slora", init=_slora_init, factors=amb_factors, trainable=lambda c: ("A", "M", "B")
)
NLORA = Method(
    name="nlora",
    init=_nlora_init,
    factors=amb_factors,
    trainable=lambda c: ("A", "M", "B"),
    residual=_nlora_residual,
)
INTTUNE = Method(
    name="inttune",
    init=_nlora_init,
    factors=amb_factors,
    trainable=lambda c: ("M",),
    residual=_nlora_residual,
)
