"""Where a run's arrays live: the device mesh of the `mesh` config section and the layouts on it.

`Placement(mesh, rules)` holds the run's mesh (`jlora.sharding.make_mesh` of the `mesh` config
section) and the model family's rules, and places:

- the frozen base (and a trained head, and full fine-tuning's parameters) by the model family's
  rules (`jlora.models.sharding_rules`): FSDP shards large kernels over `fsdp`, tensor
  parallelism splits heads and the MLP hidden axis over `tensor`;
- the adapters by their kernel's layout (`jlora.sharding.adapter_specs`);
- the optimizer state like its leaves (optax builds it with `zeros_like`, which keeps the
  leaf's sharding) and scalars (step, counters) replicated;
- every batch over (`data`, `fsdp`) along its first axis, each device (and each process of a
  multi-host run) receiving only its rows.

On one device the mesh is 1 × 1 × 1 and every placement is the plain one.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora.sharding import MeshShape, make_mesh
  >>> place = Placement(make_mesh(MeshShape(), jax.devices()[:1]), rules=())
  >>> dict(place.mesh.shape), place.batch_divisor
  ({'data': 1, 'fsdp': 1, 'tensor': 1}, 1)
  >>> place.batch({"input_ids": jnp.ones((2, 4), jnp.int32)})["input_ids"].sharding.spec
  P(('data', 'fsdp'),)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jlora import sharding
from jlora.methods import Adapter
from jlora.sharding import P

__all__ = ["Placement"]


class Placement:
    """The run's mesh and the layouts of its base, adapters, state and batches.

    Args:
      mesh: a mesh with the axes `jlora.sharding.MESH_AXES`.
      rules: the model family's `jlora.sharding.Rule`s.
    """

    def __init__(self, mesh: Mesh, rules: Sequence[sharding.Rule]) -> None:
        self.mesh = mesh
        self.rules = tuple(rules)
        self.replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(sharding.BATCH))

    @property
    def batch_divisor(self) -> int:
        """Every batch's size must be a multiple of this (data × fsdp)."""
        return int(np.prod([self.mesh.shape[a] for a in sharding.BATCH]))

    def base_specs(self, params: Any) -> Any:
        """`PartitionSpec`s of a parameter tree by the family's rules."""
        return sharding.param_specs(params, self.rules, self.mesh)

    def base(self, params: Any) -> Any:
        """`params` placed by the family's rules."""
        return jax.device_put(params, sharding.named(self.mesh, self.base_specs(params)))

    def adapters(self, adapters: Mapping[str, Adapter], base: Any) -> dict[str, Adapter]:
        """`adapters` placed by the layouts of their kernels in `base` (kept quantized or not)."""
        kernels = sharding.kernel_specs(base, list(adapters), self.rules, self.mesh)
        specs = sharding.adapter_specs(adapters, kernels, self.mesh)
        return jax.device_put(dict(adapters), sharding.named(self.mesh, specs))

    def state(self, tree: Any) -> Any:
        """`tree` with every leaf not yet laid out on this mesh replicated on it (optimizer
        counts, the step, the guard's counters)."""

        def put(x: Any) -> Any:
            s = getattr(x, "sharding", None)
            if isinstance(s, NamedSharding) and s.mesh == self.mesh:
                return x
            return jax.device_put(x, self.replicated)

        return jax.tree.map(put, tree)

    def batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A host batch split over (data, fsdp) along its first axis: each of this process's
        devices receives only its rows (with several processes, every process holds the same
        global batch and places only its own share of it)."""
        out = {}
        for k, v in batch.items():
            host = np.asarray(v)
            out[k] = jax.make_array_from_callback(
                host.shape, self._batch, lambda index, host=host: host[index]
            )
        return out


def shardings(tree: Any) -> Any:
    """The `.sharding` of every array leaf of `tree` (the jitted steps' output layouts)."""
    return jax.tree.map(lambda x: x.sharding, tree)
