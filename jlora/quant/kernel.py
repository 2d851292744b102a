"""A frozen kernel kept quantized inside a parameter tree.

`QuantizedKernel` wraps a format's storage (`NF4Blocks`, `Int8Channels`, `GGMLBlocks`) with the
kernel's shape and dtype; it is a pytree (its arrays are the leaves), so a parameter tree holding
it goes through `jit`, `jax.tree` functions and orbax as before. `quantize_params` replaces the
2-D kernels of a tree (those matching a regex) by it.

Block formats quantize the PyTorch weight `W = K.T` (d_out, d_in), as bitsandbytes and llama.cpp
do, so a layer's NF4 blocks are those of a bitsandbytes `Linear4bit` of the same weight and the
GGML blocks those of a GGUF file; their arrays lead with the output axis, so they shard along it
(and along the input axis by whole blocks) like the kernel: `data_roles` names each array axis's
kernel axis for `jlora.sharding`.

A layer cannot read such a kernel itself: the Linen wing (`jlora.linen.quant`: `dense`,
`dequantizing`, and `jlora.inject`) runs dense layers on it, dequantizing inside each call.

Example:
  >>> import jax.numpy as jnp
  >>> params = {"fc": {"kernel": jnp.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64)}}
  >>> q = quantize_params(params, "nf4")
  >>> type(q["fc"]["kernel"]).__name__, q["fc"]["kernel"].shape
  ('QuantizedKernel', (64, 64))
  >>> back = dequantize_params(q)["fc"]["kernel"]
  >>> round(float(jnp.abs(back - params["fc"]["kernel"]).max()), 3)  # 4 bits
  0.151
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jlora.quant import ggml, int8, nf4

__all__ = [
    "FORMATS",
    "FROZEN_KERNELS",
    "QuantizedKernel",
    "data_roles",
    "dequantize_params",
    "is_quantized",
    "kernel_sharding",
    "quantize_kernel",
    "quantize_like",
    "quantize_params",
]

FORMATS = ("nf4", "int8", *ggml.FORMATS)
# The kernels a frozen base keeps quantized: every dense kernel but a classification head's
# (`pooler`, `classifier`, `score`: they train, or start fresh).
FROZEN_KERNELS = r"(?!(.*/)?(pooler|classifier|score)/).*kernel"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A (d_in, d_out) kernel stored as `fmt` (see `jlora.quant`)."""

    # The format's arrays: `nf4.NF4Blocks` of W = K.T (packed (d_out, d_in / 2) and absmax
    # (d_out, d_in / blocksize) when blocks tile the rows, else flat), `int8.Int8Channels` of K,
    # or `ggml.GGMLBlocks` of W.
    data: Any
    fmt: str = dataclasses.field(metadata={"static": True}, default="nf4")
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True}, default=())
    # The kernel's dtype before quantization; `dequantize` returns it.
    dtype: str = dataclasses.field(metadata={"static": True}, default="float32")
    blocksize: int = dataclasses.field(metadata={"static": True}, default=64)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel as `dtype` (default: its original dtype)."""
        if self.fmt == "int8":
            w = int8.dequantize(self.data)
        elif self.fmt == "nf4":
            flat = jax.tree.map(jnp.ravel, self.data)
            w = nf4.dequantize(flat, self.shape[::-1], self.blocksize).T
        else:
            w = ggml.dequantize(self.data, self.fmt).T
        return w.astype(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.data)))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


def quantize_kernel(
    kernel: Any, fmt: str = "nf4", *, blocksize: int = 64, double_quant: bool = False
) -> QuantizedKernel:
    """`kernel` (d_in, d_out) quantized as `fmt` (one of `FORMATS`; GGML formats need d_in a
    multiple of 32)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r}: expected one of {FORMATS}")
    k = jnp.asarray(kernel)
    if k.ndim != 2:
        raise ValueError(f"quantize_kernel: a 2-D (d_in, d_out) kernel, not shape {k.shape}")
    if fmt == "int8":
        data = int8.quantize(k)
    elif fmt == "nf4":
        data = _nf4_rows(nf4.quantize(k.T, blocksize, double_quant), k.shape, blocksize)
    else:
        if k.shape[0] % ggml.BLOCK:
            raise ValueError(
                f"quantize_kernel: {fmt} blocks need d_in a multiple of {ggml.BLOCK}, not "
                f"shape {k.shape}"
            )
        data = ggml.quantize(k.T, fmt)
    return QuantizedKernel(
        data=data, fmt=fmt, shape=tuple(k.shape), dtype=k.dtype.name, blocksize=blocksize
    )


def quantize_like(q: QuantizedKernel, kernel: Any) -> QuantizedKernel:
    """`kernel` quantized as `q` is (format, block size, double quantization): how an init that
    rewrites a quantized kernel (PiSSA's residual) stores the result."""
    double = q.fmt == "nf4" and q.data.absmax2 is not None
    out = quantize_kernel(kernel, q.fmt, blocksize=q.blocksize, double_quant=double)
    return dataclasses.replace(out, dtype=q.dtype)


def _nf4_rows(q: nf4.NF4Blocks, shape: tuple[int, ...], blocksize: int) -> nf4.NF4Blocks:
    """`q` (of W, d_out rows of d_in) with packed codes and block scales one row per output
    channel, when whole blocks (of an even size) tile each row; else as it is (flat)."""
    d_in, d_out = shape
    if d_in % blocksize or blocksize % 2:
        return q
    return dataclasses.replace(
        q, packed=q.packed.reshape(d_out, d_in // 2), absmax=q.absmax.reshape(d_out, -1)
    )


def data_roles(q: QuantizedKernel) -> dict[str, tuple[str | None, ...]]:
    """`{field of q.data: the kernel axis ("in", "out" or None) of each of its array's axes}`
    for every array field that is set: how the storage shards with the kernel."""
    shapes = {f.name: getattr(q.data, f.name) for f in dataclasses.fields(q.data)}
    out: dict[str, tuple[str | None, ...]] = {}
    for name, x in shapes.items():
        if x is None:
            continue
        if q.fmt == "int8":  # codes like the kernel, absmax along its output axis
            out[name] = ("in", "out") if name == "codes" else ("out",)
        elif q.fmt == "nf4" and name in ("packed", "absmax") and jnp.ndim(x) == 2:
            out[name] = ("out", "in")
        elif q.fmt in ggml.FORMATS:  # (d_out, blocks[, codes])
            out[name] = ("out", "in") + (None,) * (jnp.ndim(x) - 2)
        else:  # flat NF4 storage and double quantization's second-level scales: replicated
            out[name] = (None,) * jnp.ndim(x)
    return out


def kernel_sharding(q: QuantizedKernel) -> Any:
    """The `NamedSharding` a (d_in, d_out) kernel would have to sit where `q`'s storage sits
    (read off its largest array that spans both kernel axes), or None when the storage is not
    laid out on a mesh. What a full-precision companion of the kernel (a gradient accumulator)
    should use."""
    from jax.sharding import NamedSharding, PartitionSpec

    roles = data_roles(q)
    candidates = [n for n, r in roles.items() if "in" in r and "out" in r]
    if not candidates:
        return None
    name = max(candidates, key=lambda n: getattr(q.data, n).size)
    s = getattr(getattr(q.data, name), "sharding", None)
    if not isinstance(s, NamedSharding):
        return None
    spec = tuple(s.spec) + (None,) * (len(roles[name]) - len(s.spec))
    axes = dict(zip(roles[name], spec, strict=True))
    return NamedSharding(s.mesh, PartitionSpec(axes["in"], axes["out"]))


def quantize_params(
    params: Any,
    fmt: str = "nf4",
    pattern: str = r".*kernel",
    *,
    blocksize: int = 64,
    double_quant: bool = False,
) -> Any:
    """`params` with every 2-D leaf whose '/'-joined path fully matches `pattern` quantized."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for p, x in flat.items():
        if not (re.fullmatch(pattern, p) and not is_quantized(x) and jnp.ndim(x) == 2):
            out[p] = x
            continue
        try:
            out[p] = quantize_kernel(x, fmt, blocksize=blocksize, double_quant=double_quant)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return traverse_util.unflatten_dict(out, sep="/")


def dequantize_params(params: Any) -> Any:
    """`params` with every `QuantizedKernel` dequantized to its original dtype."""
    return jax.tree.map(
        lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized
    )
