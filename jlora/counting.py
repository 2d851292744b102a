"""Parameter counts and a per-target summary of an adapter pytree.

Example:
  >>> import jax.numpy as jnp, jlora
  >>> params = {"q": {"kernel": jnp.ones((8, 6))}}
  >>> _, ad = jlora.init(jlora.AdapterConfig(method="slora", rank=2), params)
  >>> jlora.trainable_count(ad)  # r·(d_in + d_out) + r²
  32
  >>> jlora.summary(ad)[0]["shape"]
  (8, 6)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jlora.adapters import Adapters, trainable_leaf_sizes


def trainable_count(adapters: Adapters) -> int:
    """Number of numbers the optimizer updates."""
    return sum(trainable_leaf_sizes(adapters).values())


def summary(adapters: Adapters) -> list[dict[str, Any]]:
    """One row per target: path, method, rank, kernel shape, trainable and frozen counts, scale.

    Rows also hold the method's per-target `spec.info`: GoRA's `ranks` (per stacked matrix) and
    `budget` (what uniform LoRA at the reference rank would train on that target); their sums
    compare allocation with budget.
    """
    rows = []
    trainable = trainable_leaf_sizes(adapters)
    for path, a in adapters.items():
        spec = a.spec
        total = sum(int(np.prod(v.shape)) for v in a.params.values())
        row: dict[str, Any] = {
            "path": path,
            "method": spec.method,
            "rank": spec.rank,
            "shape": spec.kernel_shape,
            "trainable": trainable[path],
            "frozen": total - trainable[path],
            "scale": spec.scale,
        }
        row.update(spec.info)
        rows.append(row)
    return rows
