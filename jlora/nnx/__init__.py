"""jlora's NNX wing: adapters inside `flax.nnx` models (`adapt`, `attach`, `detach`,
`adapters`, `optimizer`, adapter `dropout`) and kernel `layouts` read from the layers.

Everything here knows NNX's module system; the pytree math it calls (`jlora.adapters`,
`jlora.layout`, `jlora.factored`) does not. On the state, the functional API applies as is:
`jlora.init(config, nnx.state(model, nnx.Param), key, layouts=jlora.nnx.layouts(model))`,
`jlora.merge`, `jlora.gradient_stats`.
"""

from jlora.nnx.adapt import (
    AdaptedEinsum,
    AdaptedLinear,
    AdaptedLinearGeneral,
    Frozen,
    adapt,
    adapters,
    attach,
    detach,
    dropout,
    optimizer,
)
from jlora.nnx.layers import layouts

__all__ = [
    "AdaptedEinsum",
    "AdaptedLinear",
    "AdaptedLinearGeneral",
    "Frozen",
    "adapt",
    "adapters",
    "attach",
    "detach",
    "dropout",
    "layouts",
    "optimizer",
]
