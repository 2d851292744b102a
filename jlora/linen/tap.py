"""The Linen gradient tap of `jlora.gradient_stats` (see `jlora.gradstats.TAPS`).

The kernel gradient of a targeted plain `nn.Dense` is one 2-D `xᵀ @ g` matmul over flattened
tokens taken at the Dense's output, instead of autodiff through the Dense.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import gradstats, targets
from jlora.linen import quant as linen_quant
from jlora.linen.inject import last_axis_matmul


@jax.custom_vjp
def _tap(y: jax.Array, x: jax.Array, probe: jax.Array) -> jax.Array:
    """Identity on `y = x @ K (+ b)`; the cotangent of `probe` (shaped like K) is `K`'s gradient."""
    return y


def _tap_fwd(y, x, probe):
    return y, (x, probe)


def _tap_bwd(res, g):
    x, probe = res
    # `xᵀ @ g` over flattened tokens as one 2-D matmul accumulated in fp32. Autodiff through the
    # Dense contracts the 3-D tensors over (batch, seq) instead, and XLA-CPU then materialises a
    # transposed copy of every layer's output gradient for it (see jlora.lowrank).
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dk = jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32).astype(probe.dtype)
    return g, jnp.zeros_like(x), dk


_tap.defvjp(_tap_fwd, _tap_bwd)


def _interceptor(probes: dict[str, jax.Array], tapped: set[str]) -> Any:
    """An interceptor routing the kernel gradient of each targeted plain Dense through `_tap`."""
    by_module = targets.module_index(probes)

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not _plain_dense(module):
            return y
        path = by_module.get("/".join(module.path))
        if path is None:
            return y
        x = args[0] if args else kwargs["inputs"]
        if probes[path].shape != (x.shape[-1], y.shape[-1]):
            return y  # a stacked kernel (nn.scan layers): this call sees one slice of it
        tapped.add(path)
        return _tap(y, x, probes[path])

    return interceptor


def _plain_dense(module: nn.Module) -> bool:
    """`nn.Dense`, or an `nn.DenseGeneral` that is a matmul over the last axis, with the default
    dot product (a custom `dot_general`, e.g. a quantized one, keeps autodiff)."""
    if type(module) not in (nn.Dense, nn.DenseGeneral):
        return False
    if module.dot_general is not None or module.dot_general_cls is not None:
        return False
    return last_axis_matmul(module)


@gradstats.register_tap
@contextlib.contextmanager
def tap(probes: dict[str, jax.Array], tapped: set[str]) -> Iterator[None]:
    """Within this context, Linen layers run quantized kernels dequantized and targeted plain
    Dense layers route their kernel gradient through `probes`."""
    with linen_quant.dequantizing(), nn.intercept_methods(_interceptor(probes, tapped)):
        yield
