"""PiSSA (Meng et al. 2024): factors from the top-r SVD of K; the frozen kernel keeps the rest.

`K = U S Vᵀ`, `A = U_r √S_r / √s`, `B = √S_r V_rᵀ / √s`, so `s · A @ B` is the rank-r truncation
of K. The frozen kernel becomes `K − s · A @ B`, computed from the factors actually used, so the
output at init is exact even with a randomized SVD (`pissa_niter`: power iterations, seeded from
the target's key so a reload reproduces it; `pissa_oversample` extra sketch columns, 0 for PEFT's
`pissa_niter_k`, which runs `torch.svd_lowrank` with q = r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora.config import AdapterConfig
from jlora.methods.base import AdapterSpec, Leaves, Method, amb_factors, per_matrix


def _init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    r, root_s = spec.rank, jnp.sqrt(jnp.float32(spec.scale))

    def one(k: jax.Array, W: jax.Array) -> Leaves:
        if config.pissa_niter is None:
            U, S, Vt = linalg.top_svd(W, r)
        else:
            U, S, Vt = linalg.randomized_svd(
                W, r, config.pissa_niter, k, oversample=config.pissa_oversample
            )
        root = jnp.sqrt(S)
        return {"A": U * root / root_s, "B": root[:, None] * Vt / root_s}

    return per_matrix(one, spec.stack, key, K)


PISSA = Method(
    name="pissa",
    init=_init,
    factors=amb_factors,
    trainable=lambda c: ("A", "B"),
    residual=lambda c: True,
)
