"""llama.cpp's GGML block formats Q4_0, Q4_1 and Q8_0, bit for bit, in JAX: kept as stored.

A GGUF tensor of PyTorch shape (rows, cols) is stored row by row, each row in blocks of 32
values along `cols`; a block holds a float16 scale `d` (Q4_1 also a float16 minimum `m`) and
its 32 codes:

- Q4_0: `x ≈ (q − 8)·d`, q in 0..15, with `d = v / −8` for the block's value `v` of largest
  magnitude (its sign kept); two codes a byte, element j in the low nibble of byte j and element
  j + 16 in the high nibble.
- Q4_1: `x ≈ q·d + m`, with `m` the block's minimum and `d = (max − min) / 15`; same packing.
- Q8_0: `x ≈ q·d`, q int8, `d = absmax / 127`, rounding half away from zero.

`quantize` follows gguf-py's reference `quantize_blocks` (the same codes and scales for the same
float32 input: `tests/test_quant.py`), `dequantize` its `dequantize_blocks`, and `from_bytes`
splits a GGUF file's raw block bytes into a `GGMLBlocks` without dequantizing anything.

Example:
  >>> import jax.numpy as jnp
  >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
  >>> q = quantize(w, "q8_0")
  >>> q.d.shape, q.qs.shape, q.qs.dtype.name
  ((2, 1), (2, 1, 32), 'int8')
  >>> float(jnp.max(jnp.abs(dequantize(q, "q8_0") - w))) < 0.005
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BLOCK", "FORMATS", "GGMLBlocks", "dequantize", "from_bytes", "quantize", "to_bytes"]

BLOCK = 32
FORMATS = ("q4_0", "q4_1", "q8_0")
# Bytes of one block: d (float16), [m (float16)], codes.
_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16, "q8_0": 2 + 32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GGMLBlocks:
    """The blocks of a (rows, cols) tensor, `cols` a multiple of 32: all arrays lead with rows."""

    # float16 (rows, cols / 32): each block's scale.
    d: jax.Array
    # Q4_0 / Q4_1: uint8 (rows, cols / 32, 16), two codes a byte; Q8_0: int8 (rows, cols / 32, 32).
    qs: jax.Array
    # Q4_1 only: float16 (rows, cols / 32), each block's minimum.
    m: jax.Array | None = None


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"GGML block format {fmt!r}: expected one of {FORMATS}")


def _blocks(w: Any) -> jax.Array:
    w = jnp.asarray(w).astype(jnp.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(
            f"GGML blocks: a (rows, cols) tensor with cols a multiple of {BLOCK}, not {w.shape}"
        )
    return w.reshape(w.shape[0], -1, BLOCK)


def _inverse(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))


def _pack(q: jax.Array) -> jax.Array:
    """uint8 codes (..., 32) -> bytes (..., 16): element j low nibble, element j + 16 high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _roundf(x: jax.Array) -> jax.Array:
    """C's roundf (half away from zero), computed as gguf-py's `np_roundf`."""
    a = jnp.abs(x)
    floored = jnp.floor(a)
    return jnp.sign(x) * (floored + jnp.floor(2 * (a - floored)))


def quantize(w: Any, fmt: str) -> GGMLBlocks:
    """`w` (rows, cols) in GGML blocks of format `fmt` (jittable)."""
    _check(fmt)
    x = _blocks(w)
    if fmt == "q8_0":
        d = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
        qs = _roundf(x * _inverse(d)).astype(jnp.int8)
        return GGMLBlocks(d=d[..., 0].astype(jnp.float16), qs=qs)
    if fmt == "q4_0":
        imax = jnp.argmax(jnp.abs(x), axis=-1, keepdims=True)
        d = jnp.take_along_axis(x, imax, axis=-1) / -8
        q = jnp.trunc(x * _inverse(d) + np.float32(8.5))
        return GGMLBlocks(d=d[..., 0].astype(jnp.float16), qs=_pack(_codes4(q)))
    hi = jnp.max(x, axis=-1, keepdims=True)
    lo = jnp.min(x, axis=-1, keepdims=True)
    d = (hi - lo) / 15
    q = jnp.trunc((x - lo) * _inverse(d) + np.float32(0.5))
    return GGMLBlocks(
        d=d[..., 0].astype(jnp.float16), qs=_pack(_codes4(q)), m=lo[..., 0].astype(jnp.float16)
    )


def _codes4(q: jax.Array) -> jax.Array:
    # The values are ≥ 0 (NaN aside); numpy's float -> uint8 cast then clip, as gguf-py.
    return jnp.clip(q, 0, 15).astype(jnp.uint8)


def dequantize(q: GGMLBlocks, fmt: str) -> jax.Array:
    """The float32 (rows, cols) tensor `q` stores."""
    _check(fmt)
    d = q.d.astype(jnp.float32)[..., None]
    if fmt == "q8_0":
        x = q.qs.astype(jnp.float32) * d
    else:
        codes = jnp.concatenate([q.qs & 0xF, q.qs >> 4], axis=-1)
        if fmt == "q4_0":
            x = (codes.astype(jnp.int8) - 8).astype(jnp.float32) * d
        else:
            x = d * codes.astype(jnp.float32) + q.m.astype(jnp.float32)[..., None]
    return x.reshape(x.shape[0], -1)


def from_bytes(raw: np.ndarray, fmt: str, rows: int) -> GGMLBlocks:
    """The blocks of a GGUF tensor's raw bytes (uint8, `rows` rows), as host NumPy arrays."""
    _check(fmt)
    b = np.ascontiguousarray(np.asarray(raw, np.uint8)).reshape(rows, -1, _BLOCK_BYTES[fmt])
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]
    if fmt == "q4_1":
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]
        return GGMLBlocks(d=d, qs=np.ascontiguousarray(b[..., 4:]), m=m)
    qs = np.ascontiguousarray(b[..., 2:])
    return GGMLBlocks(d=d, qs=qs.view(np.int8) if fmt == "q8_0" else qs)


def to_bytes(q: GGMLBlocks, fmt: str) -> np.ndarray:
    """The GGUF bytes (uint8 (rows, row bytes)) of `q`: the inverse of `from_bytes`."""
    _check(fmt)
    parts = [np.asarray(q.d, np.float16)[..., None].view(np.uint8)]
    if fmt == "q4_1":
        parts.append(np.asarray(q.m, np.float16)[..., None].view(np.uint8))
    parts.append(np.asarray(q.qs).view(np.uint8))
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)
