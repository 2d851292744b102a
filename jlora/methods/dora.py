"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"), as PEFT 0.21 computes it.

The adapted kernel is a trainable magnitude times a direction:
`K' = (m / ‖K + s·A@B‖_c) ⊙ (K + s·A@B)`, with ‖·‖_c the norm of each column (over the input
axis: our kernels are `(d_in, d_out)`, so a column is PyTorch's per-output row of `W + s·B@A`).
Leaves: LoRA's A (d_in, r) and B (r, d_out), initialised as `lora` does (its options, so
`lora_init="gaussian"` works here too), and the magnitude `m (d_out,)`, initialised to the column
norms of `K + s·A@B` (of K, as B = 0): the output is unchanged at init. As in PEFT (and section 4.3
of the paper), the norm is a constant for the gradient: `‖K + s·A@B‖_c` is computed from A and B
but never differentiated, so A and B get gradients only through the direction's numerator and m
through `m / ‖…‖_c`.

- Factored path (`jlora.inject`), PEFT's `DoraLinearVariant.forward`: with `y = x@K + b` the frozen
  output, `ŷ = y + (m/n − 1)·x@K + (m/n)·s·(x@A)@B`. Without dropout that is
  `(m/n)·(y − b + s·(x@A)@B) + b`, with no second `x@K`; with dropout, PEFT recomputes the base
  part on the dropped input, so `ŷ = y + (m/n − 1)·drop(x)@K + (m/n)·s·(drop(x)@A)@B` (one more
  full matmul per target). The norm n is computed from the formed `K + s·A@B`
  (`column_norm`): on CPU that measured as fast as or faster than the algebra that avoids
  `A@B` (`python -m benchmarks.dora_cost`).
- Merged path (`jlora.merge`): `K'` above, PEFT's `merge` (the norm detached there too, so the
  merged path trains like the factored one).
- `delta` and `unmerge` raise ValueError: ΔK needs K, and a merged kernel keeps only the direction
  of each column of `K + s·A@B`, not its norm, so K cannot be recovered from it.
- PEFT export (`jlora.interop.peft.to_peft`): `use_dora=True`, lora_A/lora_B as for LoRA and
  `lora_magnitude_vector = m` (the `peft_extra` hook).

Example:
  >>> import jax.numpy as jnp, jlora
  >>> import jlora.methods.dora  # registers "dora" (until jlora.methods imports it)
  >>> K = jnp.array([[3.0, 0.0], [4.0, 2.0]])
  >>> base, ad = jlora.init(jlora.AdapterConfig(method="dora", rank=1), {"q": {"kernel": K}})
  >>> ad["q/kernel"].params["m"].tolist(), ad["q/kernel"].spec.trainable
  ([5.0, 2.0], ('A', 'B', 'm'))
  >>> bool(jnp.allclose(jlora.merge(base, ad)["q"]["kernel"], K))
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora.lowrank import lowrank
from jlora.methods.base import (
    IN,
    OUT,
    RANK,
    AdapterSpec,
    Layer,
    Leaf,
    Leaves,
    dropout,
    register,
)
from jlora.methods.lora import Lora


def column_norm(K: jax.Array, A: jax.Array, B: jax.Array, s: Any) -> jax.Array:
    """`‖K + s·A@B‖_c`, the norm of each column (over the input axis, -2); stacked axes OK.

    `s` is a float or broadcasts to `(*stack, 1, 1)`. The adapted kernel is formed: on CPU this
    is as fast as or faster than the algebra that avoids `A@B` (`‖K‖²_c + s·Σ_r B ⊙ (2·AᵀK +
    s·AᵀA@B)`, `benchmarks.dora_cost.column_norm_unformed`) at MiniLM's shapes (see
    BENCHMARKS.md).
    """
    W = K + s * linalg.mm(A, B)
    return jnp.sqrt(jnp.sum(W * W, axis=-2))


class Dora(Lora):
    """DoRA: LoRA's A and B for the direction, a trainable magnitude m per output column."""

    name = "dora"
    # How the factored path computes ‖K + s·A@B‖_c (`python -m benchmarks.dora_cost` swaps in
    # the alternative it times against it).
    norm = staticmethod(column_norm)

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        return {"A": Leaf((IN, RANK)), "B": Leaf((RANK, OUT)), "m": Leaf((OUT,))}

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        leaves = super().init(K, key, spec, grad)  # A as `lora` draws it (per matrix), B = 0
        s = jnp.asarray(spec.scale_array())
        leaves["m"] = column_norm(K, leaves["A"], leaves["B"], s)
        return leaves

    def factors(
        self, params: Leaves, spec: AdapterSpec
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """The direction's low-rank update `(A, None, B)`: `K + s·A@B` before normalisation (not
        ΔK of the adapted kernel; `merge` and `output` apply the magnitude)."""
        return params["A"], None, params["B"]

    def delta(self, params: Leaves, spec: AdapterSpec) -> jax.Array:
        raise ValueError(
            "method 'dora': ΔK = (m / ‖K + s·A@B‖_c)·(K + s·A@B) − K depends on the frozen kernel "
            "K, which delta(params, spec) does not get; use jlora.merge(base_params, adapters) "
            "for the adapted kernels (and subtract the base kernels if ΔK itself is wanted)"
        )

    def merge(self, K: jax.Array, params: Leaves, spec: AdapterSpec) -> jax.Array:
        """`(m / ‖K + s·A@B‖_c) ⊙ (K + s·A@B)`, the norm detached (as PEFT's forward)."""
        W = K + jnp.asarray(spec.scale_array()) * linalg.mm(params["A"], params["B"])
        n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(W * W, axis=-2)))
        return (params["m"] / n)[..., None, :] * W

    def unmerge(self, K: jax.Array, params: Leaves, spec: AdapterSpec) -> jax.Array:
        raise ValueError(
            "method 'dora': a merged kernel cannot be unmerged. Each merged column is "
            "m·(K + s·A@B)/‖K + s·A@B‖ and keeps only the direction of K + s·A@B: every "
            "K_j = t·K'_j/m_j − s·(A@B)_j with t > 0 merges to the same column, and the norm t "
            "is not stored (PEFT caches it at merge time). Keep the base parameters instead: "
            "jlora.merge returns a new pytree and leaves them unchanged"
        )

    def output(
        self,
        x: jax.Array,
        y: jax.Array,
        layer: Layer,
        params: Leaves,
        spec: AdapterSpec,
        key: jax.Array | None,
    ) -> jax.Array:
        """PEFT's DoRA forward (see the module docstring), computed in `y.dtype`; the norm in
        fp32, detached."""
        A, B, m = params["A"], params["B"], params["m"]
        K = layer.kernel
        n = self.norm(K.astype(jnp.float32), A, B, jnp.float32(spec.scale))
        g = (m / jax.lax.stop_gradient(n)).astype(y.dtype)
        dtype = y.dtype
        A, B = A.astype(dtype), B.astype(dtype)
        if key is None or spec.dropout <= 0:
            lora = lowrank(x.astype(dtype), A, None, B, spec.scale)
            bias = layer.bias
            if bias is None:
                return g * (y + lora)
            bias = bias.astype(dtype)
            return g * (y - bias + lora) + bias
        xd = dropout(x, spec.dropout, key).astype(dtype)
        base = jnp.matmul(xd, K.astype(dtype))
        return y + (g - 1) * base + g * lowrank(xd, A, None, B, spec.scale)

    def peft_extra(self, params: Leaves, spec: AdapterSpec) -> tuple[dict[str, Any], Leaves]:
        return {"use_dora": True}, {"lora_magnitude_vector": params["m"]}


register(Dora())
