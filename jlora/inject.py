"""The factored path: adapters inside any Flax Linen model, without forming ΔK.

`jlora.inject(adapters)` intercepts `nn.Dense` / `nn.DenseGeneral` calls (through
`flax.linen.intercept_methods`) whose kernel path has an adapter, and adds
`s · ((drop(x) @ A) @ M) @ B` to their output. The model's code is not touched, so it works for
third-party Linen models too. The adapter of a module at `module.path == ("enc", "q")` is the one
keyed `"enc/q/kernel"` (or `"params/enc/q/kernel"` if the adapters were made from a whole
variables dict).

Enter the context *inside* the function you jit or differentiate: the adapters are read while
tracing, so a jitted function called inside the context would keep the adapters of its first trace.

Not covered (use the merged path, `model.apply({"params": jlora.merge(base, adapters)}, x)`):
adapters of stacked kernels (`nn.scan` layers: the interceptor cannot know the layer index),
`nn.DenseGeneral` with several input or output axes, and `nn.Einsum`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
  >>> model = nn.Dense(4)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> base, ad = jlora.init(jlora.AdapterConfig(method="slora", rank=2), {"params": params})
  >>> with jlora.inject(ad):
  ...     y = model.apply(base, jnp.ones((1, 8)))
  >>> y.shape
  (1, 4)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import targets
from jlora.adapters import Adapters
from jlora.lowrank import lowrank
from jlora.methods import METHODS, Adapter


def factored_delta(x: jax.Array, adapter: Adapter, dtype: Any, key: jax.Array | None) -> jax.Array:
    """`s · ((drop(x) @ A) @ M) @ B` in `dtype`; dropout only when `key` is given."""
    spec = adapter.spec
    A, M, B = METHODS[spec.method].factors(adapter.params, spec)
    if key is not None and spec.dropout > 0:
        keep = 1.0 - spec.dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    M = None if M is None else M.astype(dtype)
    return lowrank(x.astype(dtype), A.astype(dtype), M, B.astype(dtype), spec.scale)


def last_axis_matmul(module: nn.Dense | nn.DenseGeneral) -> bool:
    """Whether the module's kernel is a (d_in, d_out) matmul over its input's last axis (every
    `nn.Dense`; an `nn.DenseGeneral` with one input axis, -1, one feature axis, no batch dims)."""
    if not isinstance(module, nn.DenseGeneral):
        return True
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    return axis == (-1,) and len(feats) == 1 and not module.batch_dims


def _check_module(module: nn.Module, path: str, adapter: Adapter) -> None:
    spec = adapter.spec
    if spec.stack:
        raise ValueError(
            f"jlora.inject: the adapter of {path!r} is for a stacked kernel {spec.kernel_shape}; "
            "the factored path handles 2-D kernels only. Use the merged path: "
            "model.apply({'params': jlora.merge(base, adapters)}, ...)"
        )
    if not last_axis_matmul(module):
        raise ValueError(
            f"jlora.inject: nn.DenseGeneral at {path!r} (axis={module.axis}, "
            f"features={module.features}, batch_dims={module.batch_dims}) is not a plain "
            "matmul over the last axis; use the merged path (jlora.merge)"
        )


@contextlib.contextmanager
def inject(adapters: Adapters, *, rng: jax.Array | None = None) -> Iterator[None]:
    """Within this context, Linen `model.apply` runs every targeted dense layer factored.

    Args:
      adapters: `{kernel path: Adapter}` from `jlora.init`.
      rng: a PRNG key enabling adapter dropout (each target folds in its path); None = no
        dropout (evaluation).

    Warns if no targeted module ran inside the context (wrong paths, or a jitted function traced
    before the context was entered).
    """
    by_module = {m: (p, adapters[p]) for m, p in targets.module_index(adapters).items()}
    used: set[str] = set()

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        hit = by_module.get("/".join(module.path))
        if hit is None:
            return next_fun(*args, **kwargs)
        path, adapter = hit
        _check_module(module, path, adapter)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        key = None if rng is None else jax.random.fold_in(rng, targets.stable_hash(path))
        used.add(path)
        return y + factored_delta(x, adapter, y.dtype, key)

    with nn.intercept_methods(interceptor):
        yield
    if adapters and not used:
        warnings.warn(
            "jlora.inject: no targeted module ran inside the context. Check that adapter paths "
            f"(e.g. {next(iter(adapters))!r}) match module paths, and enter the context inside "
            "the jitted function, not around a call of it.",
            stacklevel=3,
        )
