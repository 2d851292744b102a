"""NOLA (Koohpayegani et al., ICLR 2024): factors as mixtures of frozen random bases.

`A = A0 + Σ_i α_i A_i`, `B = Σ_j β_j B_j`, `ΔK = s · A @ B`; only α (k numbers) and β (l numbers)
train. Bases `A_i: (d_in, r)` and `B_j: (r, d_out)` are U(−1, 1)/√k (resp. /√l) and `A0` is a
frozen Kaiming-uniform offset, all drawn from the target's static seed (`AdapterSpec.nola_seed`;
stacked matrices fold in their flat index). α = β = 0 at init, so ΔK = 0 and the offset lets β
receive a gradient from the first step. With `nola_basis="regenerate"` (default) the bases are
drawn again inside every step (nothing stored; O(k·r·d) transient memory); with `"cache"` they
are frozen leaves of the adapter, which is faster and larger.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora.config import AdapterConfig
from jlora.methods.base import AdapterSpec, Leaves, Method, kaiming_uniform

BASIS_LEAVES = ("A0", "A_basis", "B_basis")


def bases(spec: AdapterSpec) -> Leaves:
    """The frozen offset and bases of a NOLA target, regenerated from its seed (traceable)."""
    k, l = spec.nola_num_basis
    r, d_in, d_out = spec.rank, spec.d_in, spec.d_out

    def one(key: jax.Array) -> Leaves:
        k0, ka, kb = jax.random.split(key, 3)
        return {
            "A0": kaiming_uniform(k0, d_in, r),
            "A_basis": jax.random.uniform(ka, (k, d_in, r), jnp.float32, -1.0, 1.0) / math.sqrt(k),
            "B_basis": jax.random.uniform(kb, (l, r, d_out), jnp.float32, -1.0, 1.0) / math.sqrt(l),
        }

    root = jax.random.key(spec.nola_seed)
    if not spec.stack:
        return one(root)
    n = math.prod(spec.stack)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(n, dtype=jnp.uint32))
    flat = jax.vmap(one)(keys)
    return {name: v.reshape(spec.stack + v.shape[1:]) for name, v in flat.items()}


def _init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    k, l = spec.nola_num_basis
    leaves = {
        "alpha": jnp.zeros((*spec.stack, k), jnp.float32),
        "beta": jnp.zeros((*spec.stack, l), jnp.float32),
    }
    if config.nola_basis == "cache":
        leaves.update(bases(spec))
    return leaves


def _mix(coef: jax.Array, basis: jax.Array) -> jax.Array:
    """`Σ_i coef_i · basis_i` over `(*stack, n, a, b)` bases, as a matrix-vector product.

    The bases are flattened to `(*stack, n, a·b)` first: XLA's CPU backward of the equivalent
    4-axis einsum is ~9× slower (it transposes the whole basis tensor for the coefficients'
    gradient), which made a NOLA step on a SmolLM2-shaped decoder ~2× a LoRA step.
    """
    flat = basis.reshape(*basis.shape[:-2], -1)
    mixed = jnp.einsum("...n,...nm->...m", coef, flat, precision=jax.lax.Precision.HIGHEST)
    return mixed.reshape(*basis.shape[:-3], *basis.shape[-2:])


def _factors(params: Leaves, spec: AdapterSpec) -> tuple[jax.Array, None, jax.Array]:
    b = {n: params[n] for n in BASIS_LEAVES} if "A_basis" in params else bases(spec)
    alpha, beta = params["alpha"], params["beta"]
    A = b["A0"].astype(alpha.dtype) + _mix(alpha, b["A_basis"])
    B = _mix(beta, b["B_basis"])
    return A, None, B


NOLA = Method(name="nola", init=_init, factors=_factors, trainable=lambda c: ("alpha", "beta"))
