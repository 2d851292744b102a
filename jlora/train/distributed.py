"""Several processes (hosts) in one run: `jax.distributed` set-up, and the few things that only
one process does or that need every process.

A multi-host run is the same program started once per host. Each process sees all devices of
the run (`jax.devices()`) but holds only its own (`jax.local_devices()`); the mesh, the jitted
steps and orbax's checkpoints span all of them, and every process must make the same calls in
the same order. What changes:

- `initialize(cfg.distributed)` calls `jax.distributed.initialize` before any device is
  touched, from the config's `distributed` section or the environment (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or by cluster auto-detection (`auto: true`: SLURM,
  Open MPI, Kubernetes, Cloud TPU). On CPUs the processes talk through gloo (TCP).
- Files are written by process 0 only (`is_main`): metrics, history, config, summary, report;
  orbax writes each process's shards of a checkpoint and process 0 its metadata.
- Values read on the host (checksums, the non-finite check, generated tokens) come from
  `to_host`, which gathers an array that spans other processes' devices.

With one process every function here is the single-host behaviour.

Example:
  >>> settings(DistributedConfig(), environ={})  # no coordinator: one process
  >>> settings(DistributedConfig(coordinator="10.0.0.1:1234", num_processes=2, process_id=1),
  ...          environ={})
  {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora.errors import ConfigError

__all__ = [
    "DistributedConfig",
    "any_process",
    "barrier",
    "initialize",
    "is_main",
    "settings",
    "to_host",
]

log = logging.getLogger(__name__)

ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """The `distributed` config section: how the processes of a multi-host run find each other.
    Every field left null is read from the environment variable named beside it."""

    # "host:port" of process 0's coordination service (env JAX_COORDINATOR_ADDRESS).
    coordinator: str | None = None
    # How many processes the run has (env JAX_NUM_PROCESSES).
    num_processes: int | None = None
    # This process's index in [0, num_processes) (env JAX_PROCESS_ID); usually given per
    # process on the command line: --set distributed.process_id=1.
    process_id: int | None = None
    # Let `jax.distributed.initialize` detect what is not given from the cluster (SLURM, Open
    # MPI, Kubernetes, Cloud TPU).
    auto: bool = False


def settings(
    cfg: DistributedConfig, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """`jax.distributed.initialize` keyword arguments from `cfg` and `environ` (default:
    `os.environ`), or None for a single-process run. `ConfigError` naming the field when a
    value is invalid or incomplete."""
    environ = os.environ if environ is None else environ
    got: dict[str, Any] = {}
    for field, var in ENV.items():
        value = getattr(cfg, field)
        where = f"distributed.{field}"
        if value is None and environ.get(var, "") != "":
            value, where = environ[var], var
            if field != "coordinator":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{var}={value!r}: expected an integer") from None
        if value is not None:
            got[field] = (value, where)
    if not got and not cfg.auto:
        return None
    if "coordinator" in got:
        addr, where = got["coordinator"]
        host, _, port = str(addr).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{where}={addr!r}: expected 'host:port'")
    if "num_processes" in got and got["num_processes"][0] < 1:
        raise ConfigError(f"{got['num_processes'][1]}={got['num_processes'][0]}: expected >= 1")
    if "process_id" in got:
        pid, where = got["process_id"]
        n = got.get("num_processes", (None,))[0]
        if pid < 0 or (n is not None and pid >= n):
            allowed = "an integer >= 0" if n is None else f"an integer in [0, {n})"
            raise ConfigError(f"{where}={pid}: expected {allowed}")
    if not cfg.auto:
        missing = [f"distributed.{f} (or {ENV[f]})" for f in ENV if f not in got]
        if missing:
            given = ", ".join(got[f][1] for f in ENV if f in got)
            raise ConfigError(
                f"{given} given but not {', '.join(missing)}: a multi-host run needs all "
                "three, or distributed.auto=true to detect them from the cluster"
            )
    names = {"coordinator": "coordinator_address"}
    return {names.get(f, f): v for f, (v, _) in got.items()}


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Join the run's processes (`jax.distributed.initialize`) when `cfg` or the environment
    asks for several; returns whether this is a multi-process run. Call it before anything
    touches a device. Idempotent: a second call with the run already joined does nothing."""
    kwargs = settings(cfg, environ)
    if kwargs is None:
        return jax.process_count() > 1
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    # CPU devices of different processes reach each other through gloo; GPUs and TPUs use
    # their own collectives, on which this setting has no effect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining the run's processes: %s", kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise ConfigError(f"distributed: jax.distributed.initialize failed ({e})") from e
    log.info(
        "process %d of %d: %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
    """`x` as a host NumPy array on every process, gathering the slices other processes hold
    (all processes must call it together for such an array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def barrier(name: str) -> None:
    """Wait until every process reaches `barrier(name)` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (all processes must call it together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))
