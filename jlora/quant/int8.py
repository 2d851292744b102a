"""int8 with one absmax per output channel (LLM.int8()'s vector-wise weight quantization,
without the outlier decomposition), bit for bit as bitsandbytes' `int8_vectorwise_quant`.

A Flax kernel is (d_in, d_out), the transpose of PyTorch's (out, in) weight, so an output
channel is a column here and a row there: `codes = round(K · 127 / absmax)` with `absmax` the
largest |K| of each column (ties to even, as `torch.round`), and `K ≈ codes · absmax / 127`.

Example:
  >>> import jax.numpy as jnp
  >>> q = quantize(jnp.array([[1.0, -0.5], [-2.0, 0.25]]))
  >>> q.codes.tolist(), q.absmax.tolist()
  ([[64, -127], [-127, 64]], [2.0, 0.5])
  >>> dequantize(q).tolist()
  [[1.0078740119934082, -0.5], [-2.0, 0.25196850299835205]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Int8Channels", "dequantize", "quantize"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Channels:
    """The stored form of an int8-quantized kernel."""

    # int8, the kernel's shape.
    codes: jax.Array
    # float32 (..., d_out): the absmax of each output channel (the last axis), over the input
    # axis (the second to last); leading (stacked-layer) axes are kept.
    absmax: jax.Array


def quantize(kernel: Any) -> Int8Channels:
    """`kernel` (..., d_in, d_out) as int8 codes with one float32 absmax per output channel."""
    k = jnp.asarray(kernel).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(k), axis=-2)
    inv = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)  # 0-column: 0
    codes = jnp.round(k * inv[..., None, :]).astype(jnp.int8)
    return Int8Channels(codes=codes, absmax=absmax)


def dequantize(q: Int8Channels) -> jax.Array:
    """The float32 kernel `q` stores (exact at each channel's absmax)."""
    return q.codes.astype(jnp.float32) * (q.absmax / 127.0)[..., None, :]
