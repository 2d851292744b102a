"""PiSSA (Meng et al. 2024): factors from the top-r SVD of K; the frozen kernel keeps the rest.

`K = U S Vᵀ`, `A = U_r √S_r / √s`, `B = √S_r V_rᵀ / √s`, so `s · A @ B` is the rank-r truncation
of K. The frozen kernel becomes `K − s · A @ B`, computed from the factors actually used, so the
output at init is exact even with a randomized SVD (`pissa_niter`: power iterations, seeded from
the target's key so a reload reproduces it; `pissa_oversample` extra sketch columns, 0 for PEFT's
`pissa_niter_k`, which runs `torch.svd_lowrank` with q = r).

Example:
  >>> import jax.numpy as jnp, jlora
  >>> K = jnp.diag(jnp.arange(1.0, 7.0))
  >>> base, ad = jlora.init(jlora.AdapterConfig(method="pissa", rank=2), {"q": {"kernel": K}}, 0)
  >>> [abs(round(float(x), 3)) for x in jnp.diag(base["q"]["kernel"])]  # top two moved out
  [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora import validation as v
from jlora.methods.base import AdapterSpec, Leaves, Method, Options, per_matrix, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class PissaOptions(Options):
    """Options of `pissa`."""

    prefix = "pissa"
    # None = full SVD; an integer = randomized SVD with this many power iterations.
    niter: int | None = None
    # With niter: extra sketch columns beyond r (Halko et al.'s oversampling; more accurate).
    # 0 runs PEFT's `pissa_niter_k` algorithm (`torch.svd_lowrank` with q = r).
    oversample: int = 8

    def __post_init__(self) -> None:
        if self.niter is not None and not v.is_int(self.niter):
            allowed = f"None (full SVD) or an integer >= 0 (at most {v.MAX_SIZE})"
            v.fail(self._flat("niter"), self.niter, allowed)
        if not v.is_int(self.oversample):
            v.fail(
                self._flat("oversample"), self.oversample, f"an integer >= 0 (at most {v.MAX_SIZE})"
            )


class Pissa(Method):
    """PiSSA: A and B from the top-r SVD; the frozen kernel keeps the residual."""

    name = "pissa"
    options_class = PissaOptions

    def residual(self, options: Options) -> bool:
        return True

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        r, root_s, o = spec.rank, jnp.sqrt(jnp.float32(spec.scale)), spec.options

        def one(k: jax.Array, W: jax.Array) -> Leaves:
            if o.niter is None:
                U, S, Vt = linalg.top_svd(W, r)
            else:
                U, S, Vt = linalg.randomized_svd(W, r, o.niter, k, oversample=o.oversample)
            root = jnp.sqrt(S)
            return {"A": U * root / root_s, "B": root[:, None] * Vt / root_s}

        return per_matrix(one, spec.stack, key, K)


register(Pissa())
