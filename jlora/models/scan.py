"""Scanned decoder layers: a model's `layers_0 … layers_{n-1}` as one stacked `layers`.

With `Llama(config, scan_layers=True)` (likewise `GPT2`'s `transformer/h_N`, `Bert`'s
`encoder/layer_N`: `LAYERS`) the decoder layers run under `nn.scan`: their parameters
are one pytree whose leaves have a leading layer axis (`model/layers/mlp/up_proj/kernel` of shape
`(layers, d_in, d_out)`), and XLA compiles one layer instead of every layer, so compile time no
longer grows with depth. `stack_layers` / `unstack_layers` convert between the two layouts (the
checkpoint key maps and exports keep the per-layer layout); adapters on stacked kernels take
`jlora.stacked_layouts(params)` and run factored through `jlora.linen.apply`.

`scanned(model, params)` / `unscanned(model, params)` switch a jlora model and its weights
between the two modes (what `train.py`'s `model.scan_layers` does after loading and before
exporting or generating), and `unstack_adapters` turns adapters of stacked kernels into the
per-layer adapters of the unrolled model (exactly: NOLA's slices keep their own bases).

Example:
  >>> import jax.numpy as jnp
  >>> p = {"model": {"layers_0": {"w": jnp.zeros(2)}, "layers_1": {"w": jnp.ones(2)}}}
  >>> s = stack_layers(p)
  >>> s["model"]["layers"]["w"].shape
  (2, 2)
  >>> sorted(unstack_layers(s)["model"])
  ['layers_0', 'layers_1']
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import factored
from jlora.adapters import Adapters

# Where each jlora family keeps its layers: `<parent>/<name>_<i>`, stacked as `<parent>/<name>`.
LAYERS = {"llama": ("model", "layers"), "gpt2": ("transformer", "h"), "bert": ("encoder", "layer")}


def _layer_keys(node: Mapping[str, Any], name: str) -> list[str]:
    keys = [k for k in node if re.fullmatch(rf"{name}_\d+", k)]
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def stack_layers(params: Any, parent: str = "model", name: str = "layers") -> Any:
    """`params` with `<parent>/<name>_<i>` subtrees stacked into one `<parent>/<name>` (leading
    axis: the layer index). Every layer must have the same structure and shapes."""
    node = params[parent]
    keys = _layer_keys(node, name)
    if not keys or [int(k.rsplit("_", 1)[1]) for k in keys] != list(range(len(keys))):
        raise ValueError(
            f"stack_layers: expected {parent}/{name}_0 … {name}_(n-1), found {sorted(node)[:6]}"
        )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(node[k] for k in keys))
    rest = {k: v for k, v in node.items() if k not in keys}
    return {**params, parent: {**rest, name: stacked}}


def unstack_layers(params: Any, parent: str = "model", name: str = "layers") -> Any:
    """Inverse of `stack_layers`."""
    node = params[parent]
    if name not in node:
        raise ValueError(f"unstack_layers: {parent}/{name} not in the parameters")
    stacked = node[name]
    n = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in node.items() if k != name}
    layers = {f"{name}_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return {**params, parent: {**rest, **layers}}


def layers_of(model: Any) -> tuple[str, str]:
    """`(parent, name)` of a jlora model's layers (`LAYERS` of its family)."""
    family = getattr(model, "family", None)
    if family not in LAYERS:
        raise ValueError(
            f"model={type(model).__name__}: scanned layers exist for jlora's families "
            f"{sorted(LAYERS)}"
        )
    return LAYERS[family]


def scanned(model: Any, params: Any) -> tuple[Any, Any]:
    """`(model with scan_layers=True, its stacked params)` from an unrolled model's."""
    return model.clone(scan_layers=True), stack_layers(params, *layers_of(model))


def unscanned(model: Any, params: Any) -> tuple[Any, Any]:
    """`(model with scan_layers=False, per-layer params)`: the inverse of `scanned`."""
    return model.clone(scan_layers=False), unstack_layers(params, *layers_of(model))


def unstack_adapters(adapters: Adapters, parent: str = "model", name: str = "layers") -> Adapters:
    """Adapters of stacked `<parent>/<name>/...` kernels as the adapters of each layer's kernel
    `<parent>/<name>_<i>/...` (`jlora.factored.unstack`); other adapters unchanged. The
    unrolled model with these equals the scanned model with `adapters`.

    Example:
      >>> import jlora
      >>> p = stack_layers({"model": {f"layers_{i}": {"q": {"kernel": jnp.ones((4, 4))}}
      ...                             for i in range(2)}})
      >>> _, ad = jlora.init(jlora.AdapterConfig(rank=2), p, 0, layouts=jlora.stacked_layouts(p))
      >>> sorted(unstack_adapters(ad))
      ['model/layers_0/q/kernel', 'model/layers_1/q/kernel']
    """
    out = {}
    for path, adapter in adapters.items():
        keys = path.split("/")
        at = next(
            (j for j in range(len(keys) - 1) if keys[j] == parent and keys[j + 1] == name), None
        )
        if at is None or not adapter.spec.stack:
            out[path] = adapter
            continue
        for i, one in enumerate(factored.unstack(adapter)):
            out["/".join([*keys[: at + 1], f"{name}_{i}", *keys[at + 2 :]])] = one
    return out
