"""The NNX layers the factored path runs (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`), how
each contracts its input with its kernel, and the layout of every such kernel of a model.

Example:
  >>> from flax import nnx
  >>> import jlora
  >>> layer = nnx.Einsum("BTD,NDH->BTNH", (4, 16, 8), rngs=nnx.Rngs(0))
  >>> jlora.nnx.layouts(layer)
  {'kernel': KernelLayout(stack=(), inputs=(1,), outputs=(0, 2))}
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jlora.layout import Contraction, KernelLayout

LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def own_kernel_shape(module: nnx.Module) -> tuple[int, ...]:
    """The kernel shape the layer itself declares (a `nnx.vmap`-stacked layer holds more axes)."""
    if isinstance(module, nnx.Einsum):
        return tuple(module.kernel_shape)
    if isinstance(module, nnx.LinearGeneral):
        return (
            *module.batch_axis.values(),
            *_tuple(module.in_features),
            *_tuple(module.out_features),
        )
    return (module.in_features, module.out_features)


def contraction(module: nnx.Module, x_ndim: int, kwargs: Any = None) -> Contraction | None:
    """How the layer contracts an input of `x_ndim` axes with its kernel (None: a plain matmul
    over the last axis)."""
    if isinstance(module, nnx.Einsum):
        eq = (kwargs or {}).get("einsum_str") or module.einsum_str
        return Contraction.parse(eq, x_ndim, type(module).__name__)
    if isinstance(module, nnx.LinearGeneral):
        axis, out = _tuple(module.axis), _tuple(module.out_features)
        batch = tuple(module.batch_axis)
        if axis in ((-1,), (x_ndim - 1,)) and len(out) == 1 and not batch:
            return None
        return Contraction.dense(x_ndim, axis, len(out), "LinearGeneral", batch=batch)
    return None


def _layout(module: nnx.Module) -> KernelLayout:
    """The layout of the layer's own kernel."""
    if isinstance(module, nnx.Einsum):
        x = module.einsum_str.replace(" ", "").split(",")[0]
        return Contraction.parse(module.einsum_str, len(x.replace("...", "")), "Einsum").layout
    if isinstance(module, nnx.LinearGeneral):
        nb, ni = len(module.batch_axis), len(_tuple(module.in_features))
        no = len(_tuple(module.out_features))
        return KernelLayout(
            tuple(range(nb)), tuple(range(nb, nb + ni)), tuple(range(nb + ni, nb + ni + no))
        )
    return KernelLayout()


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """`{kernel path: layer}` of every Linear / LinearGeneral / Einsum in `model` (paths as
    `jlora.targets.flatten(nnx.state(model))` names the kernels)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LAYERS):
            out["/".join((*map(str, path), "kernel"))] = node
    return out


def layouts(model: nnx.Module) -> dict[str, KernelLayout]:
    """`{kernel path: KernelLayout}` of every Linear, LinearGeneral and Einsum of `model`, read
    from the layers themselves; leading axes beyond the layer's own kernel (a layer made under
    `nnx.vmap`, run by `nnx.scan`) are stacked."""
    out = {}
    for path, module in modules(model).items():
        n = jax.numpy.ndim(module.kernel[...]) - len(own_kernel_shape(module))
        lay = _layout(module)
        out[path] = lay.stacked(n) if n else lay
    return out
