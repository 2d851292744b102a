"""Training checkpoints with orbax: self-describing, checksummed, never non-finite.

A checkpoint `<step>/` holds the training state (trainable leaves, optimizer state, step and
the non-finite guard's counters) as arrays and a JSON `meta`: the step, the data position, the
resolved run config, the adapter specs (method, ranks, scales, seeds) and a SHA-256 checksum of
every array. Guarantees:

- `save` refuses a state with a NaN/Inf leaf (`CheckpointError`), so bad steps can never evict
  the last good checkpoints;
- orbax writes each step into a temporary folder and renames it when complete, so a killed run
  leaves only complete checkpoints; `steps()` lists only those;
- `restore` verifies the checksum and finiteness; `restore_latest` walks back from the newest
  checkpoint to the newest one that restores cleanly, moving each damaged one to
  `<run>/damaged/<step>` (kept, not deleted) with a one-line reason;
- write errors (a full disk, a read-only folder) are one `CheckpointError` line naming the
  folder; the previous checkpoints stay intact.

Frozen base parameters are not saved: `train.py` rebuilds them (and any init that rewrote them,
e.g. PiSSA's residual) from the config. Adapters whose init needs the gradient pre-pass (GoRA)
are rebuilt from the specs in `meta` instead, so resume and export need no pre-pass.

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
  >>> ckpt.save(4, {"w": jnp.full(2, jnp.nan)}, {})
  Traceback (most recent call last):
  ...
  jlora.errors.CheckpointError: checkpoint 4: leaf ['w'] is not finite; not written
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora.errors import CheckpointError
from jlora.train.distributed import barrier, is_main, to_host

log = logging.getLogger(__name__)
# Version of the meta layout; a checkpoint without it predates self-describing checkpoints.
FORMAT = 1


def checksum(state: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host copies; with several
    processes every process computes it over the whole arrays)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.ascontiguousarray(to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def first_nonfinite(state: Any) -> str | None:
    """The path of the first floating-point leaf holding a NaN or Inf, or None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = to_host(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            return jax.tree_util.keystr(path)
    return None


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are unreadable, changed since writing, or hold NaN/Inf."""


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{'/'-joined key path: shape}` of a pytree's leaves (dict keys, attributes, indices)."""

    def name(k: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(np.shape(x)) for path, x in flat}


def _reason(e: BaseException) -> str:
    """One line from an orbax/tensorstore error (which can run to hundreds of lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence absl/orbax logging (a failed restore logs every file it tried)."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for x, level in zip(loggers, levels, strict=True):
            x.setLevel(level)


class Checkpoints:
    """`save` / `restore` / `restore_latest` / `steps` over an orbax `CheckpointManager`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2) -> None:
        self.directory = pathlib.Path(os.path.abspath(directory))
        self.keep = keep
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                # Registered up front: a fresh manager otherwise knows no handler for an item
                # until its first save/restore, and reads no metadata.
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(f"checkpoint folder {self.directory}: {_reason(e)}") from e

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write checkpoint `step` with `meta` plus the state's checksum (blocks until it is
        complete on disk). A non-finite leaf or a write error raises `CheckpointError` and
        leaves the earlier checkpoints as they were."""
        bad = first_nonfinite(state)
        if bad is not None:
            raise CheckpointError(f"checkpoint {step}: leaf {bad} is not finite; not written")
        meta = {**meta, "format": FORMAT, "checksum": checksum(state)}
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
            self.manager.wait_until_finished()
        except Exception as e:  # orbax wraps OSError (disk full, permissions) in its own types
            self._discard_partial(step)
            raise CheckpointError(
                f"writing checkpoint {step} to {self.directory} failed ({_reason(e)}); "
                f"the earlier checkpoints {self.steps()} are intact"
            ) from e

    def _discard_partial(self, step: int) -> None:
        if is_main():
            for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.close()
        self._open()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of checkpoint `step` (`CheckpointError` if unreadable)."""
        try:
            with _quiet():
                out = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
        except Exception as e:
            raise DamagedCheckpointError(
                f"checkpoint {step}: meta unreadable ({_reason(e)})"
            ) from e
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(f"checkpoint {step}: meta is not a JSON object")
        return meta

    def leaf_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """`{'/'-joined key path: shape}` of the arrays saved in checkpoint `step`."""
        try:
            with _quiet():
                item = self.manager.item_metadata(step)["state"]
            if item is None:
                raise ValueError("no metadata of item 'state'")
            tree = item.tree
        except Exception as e:
            raise DamagedCheckpointError(
                f"checkpoint {step}: metadata unreadable ({_reason(e)})"
            ) from e
        return shapes(jax.tree.map(lambda m: np.empty(m.shape, np.int8), tree))

    def check_fits(self, step: int, like: Any) -> None:
        """`CheckpointError` naming the first differing leaves if checkpoint `step` holds other
        arrays than `like` (another method, rank or model: not damage, so never quarantined)."""
        saved, want = self.leaf_shapes(step), shapes(like)
        diff = [
            f"{k}: saved {saved.get(k, 'nothing')}, this run {want.get(k, 'nothing')}"
            for k in sorted(set(saved) | set(want))
            if saved.get(k) != want.get(k)
        ]
        if diff:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this run's state "
                f"({len(diff)} leaves differ; {'; '.join(diff[:3])})"
            )

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """`(state, meta)` of checkpoint `step`, verified; `like` gives the structure, shapes
        and dtypes. Raises `CheckpointError` (one line) if it is damaged or non-finite."""
        meta = self.read_meta(step)
        self.check_fits(step, like)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            with _quiet():
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
        except Exception as e:
            raise DamagedCheckpointError(
                f"checkpoint {step}: arrays unreadable ({_reason(e)})"
            ) from e
        state = out["state"]
        if "checksum" in meta and checksum(state) != meta["checksum"]:
            raise DamagedCheckpointError(
                f"checkpoint {step}: checksum mismatch (the files changed)"
            )
        bad = first_nonfinite(state)
        if bad is not None:
            raise DamagedCheckpointError(f"checkpoint {step}: leaf {bad} is not finite")
        return state, meta

    def restore_latest(
        self, like_of: Callable[[int, dict[str, Any]], Any], *, quarantine: bool = True
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """`(step, state, meta)` of the newest checkpoint that restores cleanly, or None if
        there is none at all. `like_of(step, meta)` gives the `like` tree for a checkpoint.
        Damaged or non-finite ones are moved to `<run>/damaged/` with a warning (with
        `quarantine=False`, as export does, only skipped); if every
        checkpoint is damaged, `CheckpointError` lists them. A checkpoint that does not fit
        `like` raises `CheckpointError` at once (the run, not the files, is wrong)."""
        failures = []
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
                state, meta = self.restore(step, like_of(step, meta))
            except DamagedCheckpointError as e:
                failures.append(str(e))
                if quarantine:
                    self.quarantine(step, str(e))
                else:
                    log.warning("%s; trying an earlier checkpoint", e)
                continue
            return step, state, meta
        if failures:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
            )
        return None

    def quarantine(self, step: int, reason: str) -> pathlib.Path:
        """Move checkpoint `step` to `<run>/damaged/<step>` (with `reason.txt`), so later saves
        and resumes do not see it; nothing is deleted. With several processes, process 0 moves
        it and the others wait."""
        dest_root = self.directory.parent / "damaged"
        dest = dest_root / str(step)
        n = 1
        while dest.exists():
            dest, n = dest_root / f"{step}.{n}", n + 1
        barrier(f"jlora: quarantine {step} chosen")  # every process saw the same `dest`
        if is_main():
            dest_root.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
            (dest / "reason.txt").write_text(reason + "\n")
        barrier(f"jlora: quarantine {step} moved")
        log.warning("%s; moved to %s, falling back to an earlier checkpoint", reason, dest)
        with contextlib.suppress(Exception):
            self.manager.close()
        self._open()
        return dest

    def close(self) -> None:
        self.manager.close()
