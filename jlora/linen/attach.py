"""Adapters carried in a Linen model's parameters, so that `nn.scan` slices them per layer.

`attach(variables, adapters)` returns the variables with each adapter's leaves added next to its
kernel (`.../q/jlora_A`, ...; see `jlora.factored.attached_leaves`); `jlora.inject` reads them
from the layer when its kernel is one slice of a stacked kernel. It is traceable: call it inside
the differentiated function, on the adapters you differentiate. `apply` is the one-call form.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
  >>> class Block(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, _):
  ...         return x + nn.Dense(8, name="fc")(x), None
  >>> class Model(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
  ...                        length=3)
  ...         return scan(name="layers")(x, None)[0]
  >>> model, x = Model(), jnp.ones((2, 8))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> cfg = jlora.AdapterConfig(method="lora", rank=2)
  >>> base, ad = jlora.init(cfg, params, 0, layouts=jlora.linen.layouts(model, x))
  >>> jlora.linen.apply(model, {"params": base}, ad, x).shape
  (2, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora import factored
from jlora.adapters import Adapters
from jlora.linen.inject import inject


def _node(tree: Any, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def attach(variables: Any, adapters: Adapters) -> Any:
    """`variables` (a Linen variables dict or its "params" collection) with each adapter's leaves
    added to its kernel's module. Adapter paths are relative to the tree given to `jlora.init`:
    a path without a "params/" prefix is looked up under `variables["params"]` too.

    Raises:
      KeyError: an adapter whose kernel is not in `variables`.
    """
    out = _copy(variables)
    for path, adapter in adapters.items():
        keys = path.split("/")[:-1]
        node = _node(out, keys)
        if node is None and "params" in out and keys[:1] != ["params"]:
            node = _node(out, ["params", *keys])
        if not isinstance(node, dict) or "kernel" not in node:
            raise KeyError(f"attach: adapter {path!r} has no kernel in the variables")
        node.update(factored.attached_leaves(adapter))
    return out


def _copy(tree: Any) -> Any:
    """A copy of the nested dicts (the arrays shared)."""
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def apply(
    model: nn.Module,
    variables: Any,
    adapters: Adapters,
    *args: Any,
    rng: jax.Array | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> Any:
    """`model.apply(variables, *args, **kwargs)` with every adapter on the factored path,
    scanned layers included (`inject` around `apply` of the `attach`ed variables).

    `rng` enables adapter dropout (see `jlora.inject`); `strict` as in `jlora.inject`. Other
    keyword arguments (`method=`, `rngs=`, `mutable=`, ...) go to `model.apply`.
    """
    with inject(adapters, rng=rng, strict=strict):
        return model.apply(attach(variables, adapters), *args, **kwargs)
