"""Quantized storage of frozen kernels: NF4 (bitsandbytes' 4-bit NormalFloat blocks, with
optional double quantization of the scales), int8 (one absmax per output channel) and llama.cpp's
GGML blocks Q4_0, Q4_1 and Q8_0 (as a GGUF file stores them: `jlora.models.load(...,
quantize="gguf")` keeps them).

Each format is a pytree of arrays (`NF4Blocks`, `Int8Channels`, `GGMLBlocks`), so it passes
through `jit`, `jax.tree` functions and orbax like any parameter; `quantize` / `dequantize` are
jittable.
`QuantizedKernel` keeps a frozen kernel quantized inside a parameter tree (`quantize_params`);
`jlora.inject` and `dequantizing()` (the Linen wing's `jlora.linen.quant`) run Linen dense
layers on it, dequantizing inside each call.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import quant
  >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
  >>> q = quant.nf4.quantize(w, blocksize=64)
  >>> q.packed.shape, q.absmax.shape
  ((64,), (2,))
  >>> round(float(jnp.max(jnp.abs(quant.nf4.dequantize(q, w.shape) - w))), 3)  # 4 bits
  0.146
"""

from jlora.quant import ggml, int8, kernel, loftq, nf4
from jlora.quant.ggml import GGMLBlocks
from jlora.quant.int8 import Int8Channels
from jlora.quant.kernel import (
    FORMATS,
    FROZEN_KERNELS,
    QuantizedKernel,
    data_roles,
    dequantize_params,
    is_quantized,
    kernel_sharding,
    quantize_kernel,
    quantize_like,
    quantize_params,
)
from jlora.quant.nf4 import NF4Blocks

__all__ = [
    "FORMATS",
    "FROZEN_KERNELS",
    "GGMLBlocks",
    "Int8Channels",
    "NF4Blocks",
    "QuantizedKernel",
    "data_roles",
    "dense",
    "dequantize_params",
    "dequantizing",
    "ggml",
    "int8",
    "is_quantized",
    "kernel",
    "kernel_sharding",
    "loftq",
    "nf4",
    "quantize_kernel",
    "quantize_like",
    "quantize_params",
]


def __getattr__(name: str):
    """`dense` and `dequantizing` live in the Linen wing (`jlora.linen.quant`); imported on first
    use, so the core does not import Flax's module system."""
    if name in ("dense", "dequantizing"):
        from jlora.linen import quant as linen_quant

        return getattr(linen_quant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
