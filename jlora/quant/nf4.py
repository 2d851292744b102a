"""NF4: bitsandbytes' 4-bit NormalFloat block quantization, bit for bit, in JAX.

`quantize(x, blocksize)` flattens `x` (row-major), splits it into blocks of `blocksize` values
(the last may be shorter), scales each block by its absmax into [-1, 1], rounds every value to
the nearest of the 16 NF4 codes (ties to the lower code, as `torch.bucketize` over the codes'
midpoints) and packs two codes per byte, the first in the high nibble. `double_quant` then
quantizes the float32 absmaxes again (QLoRA's double quantization): their mean is subtracted
(`offset`) and the rest is quantized to 8-bit dynamic codes in blocks of 256, each with a
float32 absmax. The same input gives bitsandbytes' `quantize_4bit` codes, packing and scales
(`tests/test_quant.py`; the offset is a float32 mean, equal up to summation order).

Example:
  >>> import jax.numpy as jnp
  >>> q = quantize(jnp.array([0.5, -1.0, 0.0, 1.0]), blocksize=4)
  >>> q.packed.tolist(), q.absmax.tolist()  # codes 12, 0 | 7, 15
  ([192, 127], [1.0])
  >>> dequantize(q, (4,)).tolist()
  [0.44070982933044434, -1.0, 0.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant.tables import DYNAMIC8, NF4

__all__ = ["NF4Blocks", "blockwise8", "dequantize", "quantize", "unblockwise8"]

_NF4 = np.asarray(NF4, np.float32)
_DYNAMIC8 = np.asarray(DYNAMIC8, np.float32)
# Value v gets code i when bounds[i-1] < v <= bounds[i] (torch.bucketize, right=False).
_NF4_BOUNDS = (_NF4[:-1] + _NF4[1:]) / np.float32(2)
_DYNAMIC8_BOUNDS = (_DYNAMIC8[:-1] + _DYNAMIC8[1:]) / np.float32(2)
DOUBLE_QUANT_BLOCK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Blocks:
    """The stored form of an NF4-quantized tensor (all arrays; the shape is kept by its owner)."""

    # uint8 (ceil(n / 2),): two 4-bit codes per byte, the first in the high nibble.
    packed: jax.Array
    # float32 (blocks,) absmax per block; or, double-quantized, uint8 dynamic codes of
    # absmax − offset.
    absmax: jax.Array
    # Double quantization only: float32 absmax per 256 scales, and the float32 mean subtracted.
    absmax2: jax.Array | None = None
    offset: jax.Array | None = None


def _scaled_blocks(flat: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """`(absmax per block, every value / its block's absmax clipped to [-1, 1])`, computed as
    bitsandbytes does: full blocks multiply by the reciprocal, the shorter last one divides."""
    n = flat.shape[0]
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(head), axis=1)
    scaled = jnp.clip(head * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        am = jnp.maximum(jnp.max(jnp.abs(flat[full:])), 1e-38)
        absmax = jnp.concatenate([absmax, am[None]])
        scaled = jnp.concatenate([scaled, jnp.clip(flat[full:] / am, -1, 1)])
    return absmax, scaled


def blockwise8(x: jax.Array, blocksize: int = DOUBLE_QUANT_BLOCK) -> tuple[jax.Array, jax.Array]:
    """`(uint8 dynamic codes, float32 absmax per block)` of a 1-D float32 array
    (bitsandbytes' `quantize_blockwise` with its default signed dynamic code)."""
    absmax, scaled = _scaled_blocks(x.astype(jnp.float32), blocksize)
    codes = jnp.searchsorted(jnp.asarray(_DYNAMIC8_BOUNDS), scaled, side="left")
    return codes.astype(jnp.uint8), absmax


def unblockwise8(codes: jax.Array, absmax: jax.Array, blocksize: int) -> jax.Array:
    """Inverse of `blockwise8` (float32)."""
    values = jnp.asarray(_DYNAMIC8)[codes.astype(jnp.int32)]
    return values * jnp.repeat(absmax, blocksize)[: values.shape[0]]


def quantize(x: Any, blocksize: int = 64, double_quant: bool = False) -> NF4Blocks:
    """The NF4 blocks of `x` (any shape, flattened row-major; see the module docstring)."""
    flat = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
    absmax, scaled = _scaled_blocks(flat, blocksize)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))
    q = jnp.searchsorted(jnp.asarray(_NF4_BOUNDS), scaled, side="left").astype(jnp.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Blocks(packed=packed, absmax=absmax)
    offset = jnp.mean(absmax)
    codes, absmax2 = blockwise8(absmax - offset)
    return NF4Blocks(packed=packed, absmax=codes, absmax2=absmax2, offset=offset)


def dequantize(q: NF4Blocks, shape: tuple[int, ...], blocksize: int = 64) -> jax.Array:
    """The float32 tensor of shape `shape` that `q` stores."""
    n = int(np.prod(shape))
    codes = jnp.stack([q.packed >> 4, q.packed & 0xF], axis=1).reshape(-1)[:n]
    values = jnp.asarray(_NF4)[codes.astype(jnp.int32)]
    absmax = q.absmax
    if q.absmax2 is not None:
        absmax = unblockwise8(q.absmax, q.absmax2, DOUBLE_QUANT_BLOCK) + q.offset
    return (values * jnp.repeat(absmax, blocksize)[:n]).reshape(shape)
