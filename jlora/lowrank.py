"""The factored low-rank product `s · ((x @ A) @ M) @ B` with a hand-written backward pass.

Why not plain autodiff: the gradient of B is `hᵀ @ g`, a contraction over all tokens of the
incoming (tokens, d_out) gradient `g`. Inside a whole model XLA's CPU layout assignment fuses the
producer of `g` (e.g. GELU's backward) with a *transposed copy* of `g` for that dot — a full
(tokens, d_out) transpose per adapted layer, which made a MiniLM LoRA step ~1.8× the frozen-base
floor. Here every product is a plain 2-D matmul over flattened tokens, the scale is applied to
the rank-r activation, and the saved residuals are the input (already alive as an activation) and
the two (tokens, r) activations.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.lowrank import lowrank
  >>> x, A, B = jnp.ones((2, 3, 4)), jnp.ones((4, 2)), jnp.ones((2, 5))
  >>> lowrank(x, A, None, B, 0.5).shape
  (2, 3, 5)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def lowrank(
    x: jax.Array, A: jax.Array, M: jax.Array | None, B: jax.Array, scale: float
) -> jax.Array:
    """`scale · ((x @ A) @ M) @ B` over the last axis of `x` (M optional), differentiable.

    `scale` is a Python float, or a traced scalar (one layer's scale inside a scan: GoRA's
    ranks differ per layer), which is folded into `B` so autodiff carries it."""
    if isinstance(scale, jax.Array):
        return _lowrank(x, A, M, B * scale.astype(B.dtype), 1.0)
    return _lowrank(x, A, M, B, float(scale))


def _forward(x, A, M, B, scale):
    x2 = x.reshape(-1, x.shape[-1])
    h = jnp.matmul(x2, A)
    hm = h if M is None else jnp.matmul(h, M)
    hs = hm * jnp.asarray(scale, hm.dtype)
    y = jnp.matmul(hs, B)
    return y.reshape(*x.shape[:-1], B.shape[-1]), (x2, h, hs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lowrank(x, A, M, B, scale):
    return _forward(x, A, M, B, scale)[0]


def _fwd(x, A, M, B, scale):
    y, (x2, h, hs) = _forward(x, A, M, B, scale)
    return y, (x2, h, hs, A, M, B, x.shape)


def _bwd(scale, res, g):
    x2, h, hs, A, M, B, x_shape = res
    g2 = g.reshape(-1, g.shape[-1])
    dB = jnp.matmul(hs.T, g2)
    dhm = jnp.matmul(g2, B.T) * jnp.asarray(scale, g2.dtype)
    if M is None:
        dM, dh = None, dhm
    else:
        dM, dh = jnp.matmul(h.T, dhm), jnp.matmul(dhm, M.T)
    dA = jnp.matmul(x2.T, dh)
    dx = jnp.matmul(dh, A.T).reshape(x_shape)
    return dx, dA, dM, dB


_lowrank.defvjp(_fwd, _bwd)
