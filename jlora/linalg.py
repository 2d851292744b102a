"""Linear algebra of the inits: SVD, randomized SVD, Nyström/CUR, ridge solves.

All functions take one fp32 matrix in Flax layout `K: (d_in, d_out)`, are pure and traceable
(`jit`, `vmap`), and use full-precision matmuls (on GPU/TPU the default fp32 matmul precision
is lower, which would break the exactness of the inits).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import linalg
  >>> K = jax.random.normal(jax.random.key(0), (64, 32))
  >>> U, S, Vt = linalg.top_svd(K, 4)
  >>> U.shape, S.shape, Vt.shape
  ((64, 4), (4,), (4, 32))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Full-precision matmul."""
    return jnp.matmul(a, b, precision=HIGHEST)


def top_svd(K: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-r singular triplets of K by a full (thin) SVD."""
    U, S, Vt = jnp.linalg.svd(K, full_matrices=False)
    return U[:, :r], S[:r], Vt[:r, :]


def randomized_svd(
    K: jax.Array, r: int, niter: int, key: jax.Array, oversample: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-r SVD of K by a Gaussian range finder with `niter` power iterations (Halko et al.).

    Each power iteration re-orthonormalises (QR), so it stays accurate in fp32. The sketch has
    r + oversample columns, capped at min(d_in, d_out).
    """
    d_in, d_out = K.shape
    q = min(r + oversample, d_in, d_out)
    omega = jax.random.normal(key, (d_out, q), K.dtype)
    Q, _ = jnp.linalg.qr(mm(K, omega))
    for _ in range(niter):
        Z, _ = jnp.linalg.qr(mm(K.T, Q))
        Q, _ = jnp.linalg.qr(mm(K, Z))
    Ub, S, Vt = jnp.linalg.svd(mm(Q.T, K), full_matrices=False)
    return mm(Q, Ub[:, :r]), S[:r], Vt[:r, :]


def pinv(M: jax.Array, rcond: float) -> jax.Array:
    """Pseudo-inverse dropping singular values below `rcond` times the largest."""
    U, S, Vt = jnp.linalg.svd(M, full_matrices=False)
    keep = rcond * S[0] < S
    inv = jnp.where(keep, 1.0 / jnp.where(keep, S, 1.0), 0.0)
    return mm(Vt.T * inv, U.T)


def nystrom_first(K: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CUR skeleton of the first r rows and columns: (K[:, :r], K[:r, :r], K[:r, :])."""
    return K[:, :r], K[:r, :r], K[:r, :]


def nystrom_sketch(K: jax.Array, r: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gaussian-sketch skeleton (C, U, R) = (K @ Ω, Ψᵀ @ K @ Ω, Ψᵀ @ K).

    Ω: (d_out, r) ~ N(0, 1/d_out) and Ψ: (d_in, r) ~ N(0, 1/d_in), so C and R have the magnitude
    of K's columns and rows. Cost: the two products `K @ Ω` and `Ψᵀ @ K`, plus O(d_in·r²).
    """
    d_in, d_out = K.shape
    k_omega, k_psi = jax.random.split(key)
    omega = jax.random.normal(k_omega, (d_out, r), K.dtype) / jnp.sqrt(d_out).astype(K.dtype)
    psi = jax.random.normal(k_psi, (d_in, r), K.dtype) / jnp.sqrt(d_in).astype(K.dtype)
    C = mm(K, omega)
    R = mm(psi.T, K)
    return C, mm(psi.T, C), R


def ridge_project(A: jax.Array, G: jax.Array, eps: float) -> jax.Array:
    """(AᵀA + εI)⁻¹ Aᵀ G: coefficients of G's projection onto A's column space."""
    r = A.shape[1]
    gram = mm(A.T, A) + eps * jnp.eye(r, dtype=A.dtype)
    return jnp.linalg.solve(gram, mm(A.T, G))
