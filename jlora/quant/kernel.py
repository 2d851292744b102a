"""A frozen kernel kept quantized inside a parameter tree, and the dense layers that run on it.

`QuantizedKernel` wraps a format's storage (`NF4Blocks`, `Int8Channels`) with the kernel's shape
and dtype; it is a pytree (its arrays are the leaves), so a parameter tree holding it goes through
`jit`, `jax.tree` functions and orbax as before. `quantize_params` replaces the 2-D kernels of a
tree (those matching a regex) by it.

A Linen `nn.Dense` cannot read such a kernel itself; `dense(module, x, kernel)` computes what the
layer would with the dequantized kernel (the same dtype promotion, dot_general and precision),
dequantizing inside the call, so the full-precision kernel only ever exists as a temporary of
one layer. `jlora.inject` does this for every quantized kernel it meets (with or without an
adapter), and `dequantizing()` does it for a plain `model.apply`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Dense(64)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  >>> q = quantize_params(params, "nf4")
  >>> type(q["kernel"]).__name__, q["kernel"].shape
  ('QuantizedKernel', (64, 64))
  >>> with dequantizing():
  ...     y = model.apply({"params": q}, jnp.ones((1, 64)))
  >>> want = model.apply({"params": dequantize_params(q)}, jnp.ones((1, 64)))
  >>> bool(jnp.all(y == want))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from jlora.quant import int8, nf4

__all__ = [
    "FORMATS",
    "QuantizedKernel",
    "dense",
    "dequantize_params",
    "dequantizing",
    "is_quantized",
    "quantize_kernel",
    "quantize_params",
]

FORMATS = ("nf4", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A (d_in, d_out) kernel stored as `fmt` (see `jlora.quant`)."""

    # The format's arrays: `nf4.NF4Blocks` or `int8.Int8Channels`.
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
        if self.fmt == "nf4":
            w = nf4.dequantize(self.data, self.shape, self.blocksize)
        else:
            w = int8.dequantize(self.data)
        return w.astype(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.data)))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


def quantize_kernel(
    kernel: Any, fmt: str = "nf4", *, blocksize: int = 64, double_quant: bool = False
) -> QuantizedKernel:
    """`kernel` (d_in, d_out) quantized as `fmt` ("nf4" or "int8")."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r}: expected one of {FORMATS}")
    k = jnp.asarray(kernel)
    if k.ndim != 2:
        raise ValueError(f"quantize_kernel: a 2-D (d_in, d_out) kernel, not shape {k.shape}")
    data = nf4.quantize(k, blocksize, double_quant) if fmt == "nf4" else int8.quantize(k)
    return QuantizedKernel(
        data=data, fmt=fmt, shape=tuple(k.shape), dtype=k.dtype.name, blocksize=blocksize
    )


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
    out = {
        p: quantize_kernel(x, fmt, blocksize=blocksize, double_quant=double_quant)
        if re.fullmatch(pattern, p) and jnp.ndim(x) == 2
        else x
        for p, x in flat.items()
    }
    return traverse_util.unflatten_dict(out, sep="/")


def dequantize_params(params: Any) -> Any:
    """`params` with every `QuantizedKernel` dequantized to its original dtype."""
    return jax.tree.map(
        lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def dense(module: nn.Dense | nn.DenseGeneral, x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
    """What `module(x)` computes with `kernel` dequantized (a last-axis matmul module)."""
    bias = module.get_variable("params", "bias") if module.use_bias else None
    w = kernel.dequantize()
    x, w, bias = module.promote_dtype(x, w, bias, dtype=module.dtype)
    dot_general = lax.dot_general
    if getattr(module, "dot_general_cls", None) is not None:
        dot_general = module.dot_general_cls()
    elif getattr(module, "dot_general", None) is not None:
        dot_general = module.dot_general
    y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    if bias is not None:
        y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def quantized_kernel_of(module: nn.Module) -> QuantizedKernel | None:
    """The module's quantized kernel, or None (no kernel yet, or a plain one)."""
    if not isinstance(module, nn.Dense | nn.DenseGeneral):
        return None
    if not module.has_variable("params", "kernel"):
        return None
    k = module.get_variable("params", "kernel")
    return k if is_quantized(k) else None


@contextlib.contextmanager
def dequantizing() -> Iterator[None]:
    """Within this context, every Linen dense layer whose kernel is a `QuantizedKernel` runs on
    it (dequantized inside the call). `jlora.inject` does the same by itself."""

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if context.method_name == "__call__":
            q = quantized_kernel_of(context.module)
            if q is not None:
                return dense(context.module, args[0] if args else kwargs["inputs"], q)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
