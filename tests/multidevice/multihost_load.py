"""Run once per process of a 2-process run (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES=2`,
`JAX_PROCESS_ID`, 4 host devices each): `jlora.models.load(folder, mesh=...)` of a safetensors
folder onto an FSDP mesh over all 8 devices. Prints one JSON object: {"process", "read"
(elements this process read from the files), "total" (elements in the checkpoint), "equal"
(this process's shards equal the plain load's slices)}.

  python tests/multidevice/multihost_load.py FOLDER
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import jlora.models as jm
from jlora import sharding
from jlora.models import lazy
from jlora.train.distributed import DistributedConfig, initialize


def main() -> int:
    folder = sys.argv[1]
    assert initialize(DistributedConfig()), "expected a multi-process run"
    read = [0]
    get = lazy.Lazy.__getitem__

    def counted(self, index):
        out = get(self, index)
        read[0] += out.size
        return out

    lazy.Lazy.__getitem__ = counted
    mesh = sharding.make_mesh(sharding.MeshShape(data=1, fsdp=8))
    _, params, _ = jm.load(folder, mesh=mesh)
    lazy.Lazy.__getitem__ = get
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        _, want, _ = jm.load(folder)  # the plain load, whole tensors
    equal = all(
        np.array_equal(np.asarray(shard.data), np.asarray(w)[shard.index])
        for a, w in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True)
        for shard in a.addressable_shards
    )
    total = sum(int(np.size(w)) for w in jax.tree.leaves(want))
    row = {"process": jax.process_index(), "read": read[0], "total": total, "equal": equal}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
