"""Training checkpoints with orbax: the trainable state and optimizer state as arrays, the data
position, step and resolved config as JSON.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
at any moment (SIGKILL included) leaves only complete checkpoints behind; `latest_step` sees
only those. Frozen base parameters are not saved: `train.py` recomputes them (and any init
that rewrote them, e.g. PiSSA's residual) deterministically from the config on resume.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from jlora.train.checkpoint import Checkpoints
  >>> ckpt = Checkpoints(tempfile.mkdtemp(), keep=2)
  >>> ckpt.save(3, {"w": jnp.ones(2)}, {"data": {"epoch": 0, "position": 3}})
  >>> ckpt.latest_step()
  3
  >>> state, meta = ckpt.restore(3, {"w": jnp.zeros(2)})
  >>> float(state["w"][0]), meta["data"]["position"]
  (1.0, 3)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """`save` / `restore` / `latest_step` over an orbax `CheckpointManager` in `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write checkpoint `step` (blocks until it is complete on disk)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """`(state, meta)` of checkpoint `step`; `like` gives the pytree structure and shapes."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
