"""Quantization-aware adapter inits: QPiSSA and LoftQ's alternation (Li et al. 2023).

`init(config, params, key, fmt=..., iters=n)` initialises the adapters from the full-precision
`params` (`jlora.init`), keeps the frozen base quantized as `fmt` (for a method whose init
rewrites the kernel, its residual `K − ΔK`: QPiSSA), then alternates `n` times, per target:

    ΔK ← the best rank-r fit of K − dequant(Q)     (s · A @ B; A = U√S/√s, B = √S Vᵀ/√s)
    Q  ← quantize(K − ΔK)                          (not after the last fit)

so that `dequant(Q) + ΔK` stays close to K: the quantization error moves into the adapter's
starting point. This is PEFT's `loftq_init` (the same NF4 / int8 quantizers, bit for bit, and
the same loop), with one difference: PEFT writes the SVD factors as they are and then scales
them by `lora_alpha / r` in the forward pass, so its ΔK is s times the fit unless alpha = r;
here the factors carry 1/√s each and ΔK is the fit for any alpha. The alternation needs free
factors with ΔK = s · A @ B: `lora` (LoftQ) and `pissa` (QPiSSA with LoftQ's refinement).

`relative_error(params, base, adapters)` is what the alternation reduces, per target:
‖K − (dequant(Q) + ΔK)‖_F / ‖K‖_F (for `lora` with `iters=0` it is plain quantization's).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> k = jax.random.normal(jax.random.key(0), (128, 64))
  >>> k = k + 4.0 * jnp.outer(k[:, 0], k[0])  # a strong direction, as pretrained kernels have
  >>> cfg = jlora.AdapterConfig(method="lora", rank=4)
  >>> errors = [relative_error({"w": {"kernel": k}}, *init(cfg, {"w": {"kernel": k}}, 0,
  ...           fmt="nf4", iters=n))["w/kernel"] for n in (0, 1, 5)]
  >>> errors[0] > errors[1] > errors[2]
  True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora.quant.kernel import FROZEN_KERNELS, is_quantized, quantize_like, quantize_params

__all__ = ["ALTERNATING", "init", "relative_error"]

# Methods whose ΔK = s · A @ B with free A (d_in, r) and B (r, d_out): LoftQ can refit them.
ALTERNATING = ("lora", "pissa")


def _fit(E: jax.Array, rank: int, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Factors with s · A @ B the rank-r truncated SVD of E."""
    U, S, Vt = linalg.top_svd(E, rank)
    root, root_s = jnp.sqrt(S), jnp.sqrt(scale)
    return U * root / root_s, root[:, None] * Vt / root_s


@functools.partial(jax.jit, static_argnames=("rank", "iters"))
def _alternate(K: jax.Array, q: Any, scale: jax.Array, *, rank: int, iters: int) -> tuple:
    A = B = None
    for t in range(iters):
        A, B = _fit(K - q.dequantize(jnp.float32), rank, scale)
        if t + 1 < iters:
            q = quantize_like(q, (K - scale * (A @ B)).astype(q.dtype))
    return q, A, B


def init(
    config: Any,
    params: Any,
    key: Any = None,
    *,
    fmt: str = "nf4",
    iters: int = 0,
    grads: Any = None,
    pattern: str = FROZEN_KERNELS,
    blocksize: int = 64,
    double_quant: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """`jlora.init` from the full-precision `params`, its frozen base quantized as `fmt` (the
    kernels `pattern` matches), then `iters` LoftQ alternations (see the module docstring).

    Returns `(quantized base, adapters)`, as `jlora.init` returns `(base, adapters)`.
    """
    from jlora import adapters as adapters_lib
    from jlora import targets

    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters={iters!r}: expected an integer >= 0")
    if iters and config.method not in ALTERNATING:
        raise ValueError(
            f"iters={iters} (LoftQ's alternation) refits free factors ΔK = s·A@B: method "
            f"{config.method!r} has none; expected one of {ALTERNATING}, or iters=0"
        )
    base, adapters = adapters_lib.init(config, params, key, grads=grads)
    base = quantize_params(base, fmt, pattern, blocksize=blocksize, double_quant=double_quant)
    if not iters:
        return base, adapters
    flat_k, flat_q = targets.flatten(params), targets.flatten(base)
    new_q, out = {}, dict(adapters)
    for path, a in adapters.items():
        q = flat_q[path]
        if not is_quantized(q):  # a target the pattern leaves in full precision
            continue
        k = flat_k[path].astype(jnp.float32)
        scale = jnp.float32(a.spec.scale)
        new_q[path], A, B = _alternate(k, q, scale, rank=a.spec.rank, iters=iters)
        out[path] = a.replace(params={**a.params, "A": A, "B": B})
    return targets.replace(base, new_q), out


def relative_error(params: Any, base: Any, adapters: dict[str, Any]) -> dict[str, float]:
    """`{path: ‖K − (dequant(Q) + ΔK)‖_F / ‖K‖_F}` of every target: how far the quantized base
    with its adapters at init is from the full-precision kernels `params`."""
    from jlora import adapters as adapters_lib
    from jlora import targets

    merged = targets.flatten(adapters_lib.merge(base, adapters))
    flat_k = targets.flatten(params)
    out = {}
    for path in adapters:
        k = jnp.asarray(flat_k[path], jnp.float32)
        out[path] = float(jnp.linalg.norm(k - merged[path]) / jnp.linalg.norm(k))
    return out
