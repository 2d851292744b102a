"""The layout of every Dense / DenseGeneral / Einsum kernel of a Linen model, from its modules.

`layouts(model, *args)` traces `model.init` abstractly (`jax.eval_shape`: nothing is computed or
allocated) and records, for each such layer, how it contracts its input with its kernel
(`jlora.layout.Contraction`) and which leading kernel axes a lifted transform (`nn.scan`,
`nn.vmap`) stacked on top of the kernel the layer itself sees. Pass the result to
`jlora.init(..., layouts=...)`.

Example:
  >>> import jax.numpy as jnp, flax.linen as nn, jlora
  >>> model = nn.DenseGeneral((4, 8))
  >>> jlora.linen.layouts(model, jnp.ones((1, 32)))
  {'kernel': KernelLayout(stack=(), inputs=(0,), outputs=(1, 2))}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jlora import targets
from jlora.layout import KernelLayout
from jlora.linen.inject import LAYERS, contraction


def layouts(
    model: nn.Module, *args: Any, method: Any = None, variables: Any = None, **kwargs: Any
) -> dict[str, KernelLayout]:
    """`{kernel path: KernelLayout}` of every Dense, DenseGeneral and Einsum `model` runs on
    `args` (paths relative to the "params" collection, as `jlora.init` on `params` names them;
    `jlora.init` on a whole variables dict finds them too).

    Args:
      model: a Linen module.
      *args, **kwargs: sample inputs (arrays or `jax.ShapeDtypeStruct`s) and keyword arguments
        of the call.
      method: the method to trace (default `__call__`).
      variables: trace `model.apply(variables, ...)` instead of `model.init` (shapes suffice).
    """
    inner: dict[str, tuple[KernelLayout, tuple[int, ...]]] = {}

    def interceptor(next_fun: Any, a: Any, kw: Any, context: Any) -> Any:
        y = next_fun(*a, **kw)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, LAYERS):
            x = a[0] if a else kw["inputs"]
            view = contraction(module, x, kw)
            kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
            lay = KernelLayout.default(2) if view is None else view.layout
            inner["/".join((*module.path, "kernel"))] = (lay, tuple(kernel.shape))
        return y

    def run() -> Any:
        with nn.intercept_methods(interceptor):
            if variables is None:
                rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
                return model.init(rngs, *args, method=method, **kwargs)
            model.apply(variables, *args, method=method, **kwargs)
            return variables

    shapes = jax.eval_shape(run)
    flat = targets.flatten(shapes.get("params", shapes) if hasattr(shapes, "get") else shapes)
    out = {}
    for path, (lay, seen) in inner.items():
        full = tuple(flat[path].shape) if path in flat else seen
        n = len(full) - len(seen)
        out[path] = lay.stacked(n) if n else lay
    return out
