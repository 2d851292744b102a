"""Linen dense layers on quantized kernels (`jlora.quant.QuantizedKernel`).

A Linen `nn.Dense` cannot read a quantized kernel itself; `dense(module, x, kernel)` computes what
the layer would with the dequantized kernel (the same dtype promotion, dot_general and
precision), dequantizing inside the call, so the full-precision kernel only ever exists as a
temporary of one layer. `jlora.inject` does this for every quantized kernel it meets (with or
without an adapter), and `dequantizing()` does it for a plain `model.apply`. (`jlora.quant.dense`
and `jlora.quant.dequantizing` are these functions too.)

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jlora import quant
  >>> model = nn.Dense(64)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  >>> q = quant.quantize_params(params, "nf4")
  >>> with dequantizing():
  ...     y = model.apply({"params": q}, jnp.ones((1, 64)))
  >>> want = model.apply({"params": quant.dequantize_params(q)}, jnp.ones((1, 64)))
  >>> bool(jnp.all(y == want))
  True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora.quant.kernel import QuantizedKernel, is_quantized

__all__ = ["dense", "dequantizing", "quantized_kernel_of"]


def dense(module: nn.Dense | nn.DenseGeneral, x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
    """What `module(x)` computes with `kernel` dequantized (a last-axis matmul module).

    The dequantize-and-multiply is rematerialised (`jax.checkpoint`), as bitsandbytes'
    `MatMul4Bit` does: the backward pass dequantizes the kernel again for the input gradient
    rather than keeping the forward's copy of every layer's kernel until then. (XLA:CPU's buffer
    assignment holds all dequantized kernels at once with or without it; BENCHMARKS.md j.)
    """
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dot_general = lax.dot_general
    if getattr(module, "dot_general_cls", None) is not None:
        dot_general = module.dot_general_cls()
    elif getattr(module, "dot_general", None) is not None:
        dot_general = module.dot_general

    @jax.checkpoint
    def matmul(x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
        x, w = module.promote_dtype(x, kernel.dequantize(), dtype=module.dtype)
        return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)

    y = matmul(x, kernel)
    if bias is not None:
        (bias,) = module.promote_dtype(bias, dtype=module.dtype)
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
