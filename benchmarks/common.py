"""Timing, memory and environment helpers shared by the benchmark sections.

Every ratio the benchmarks report is taken from measurements *alternated* in one process
(`alternate`): round after round, each contender runs once, so slow drift of a shared machine
hits all of them alike. Times are medians over rounds.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_COMPILES = [0]
_SINK: list[pathlib.Path | None] = [None]


def record_to(path: pathlib.Path | None) -> None:
    """Start (truncate) a JSON-lines file that `record` appends every finished row to, so a run
    that is stopped or crashes keeps the rows it measured (`None`: stop recording)."""
    if path is not None:
        path.write_text("")
    _SINK[0] = path


def record(row: dict[str, Any]) -> dict[str, Any]:
    """Appends `row` to the `record_to` file (if any) and returns it."""
    if _SINK[0] is not None:
        with _SINK[0].open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    return row


def _count_compile(event: str, duration: float, **kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compilations() -> int:
    """XLA compilations so far in this process (any function)."""
    return _COMPILES[0]


def block(x: Any) -> Any:
    """Waits for every array in `x` (JAX or torch results alike)."""
    return jax.block_until_ready(x)


def seconds(fn: Callable[[], Any], calls: int = 1) -> float:
    """Wall time per call of `calls` back-to-back calls of `fn`, the last result waited for.

    One call (the CPU default) times the step alone; on an accelerator several calls let the
    host dispatch the next step while the device runs this one, as a training loop does.
    """
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    block(out)
    return (time.perf_counter() - t0) / calls


def alternate(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, calls: int = 1
) -> dict[str, list[float]]:
    """`{name: [seconds per call, one per round]}`, running the contenders in turn (`calls`
    back-to-back calls each, see `seconds`), `warmup` untimed rounds first.

    Example:
      >>> t = alternate({"a": lambda: 1, "b": lambda: 2}, rounds=3)
      >>> sorted(t), len(t["a"])
      (['a', 'b'], 3)
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn, calls))
    return times


def median(ts: list[float]) -> float:
    return float(statistics.median(ts))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of `num[i] / den[i]`: robust to a machine that drifts between rounds
    (each round's two timings were taken back to back)."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def xla_memory(jitted: Any, *args: Any, **static: Any) -> dict[str, int]:
    """XLA's buffer assignment for `jitted(*args)`: argument, output, temporary and peak bytes.

    `peak` = arguments + outputs + temporaries − donated (aliased) bytes: what the executable holds
    at once. The same number on every backend (CPU has no allocator statistics).
    """
    m = jitted.lower(*args, **static).compile().memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with `(key, header)` columns (missing values as '—')."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "—")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


class Call:
    """`jitted(*args, **static)` as a zero-argument callable, with its compiled memory."""

    def __init__(self, jitted: Any, *args: Any, **static: Any) -> None:
        self.jitted, self.args, self.static = jitted, args, static

    def __call__(self) -> Any:
        return self.jitted(*self.args, **self.static)

    def memory(self) -> dict[str, int]:
        return xla_memory(self.jitted, *self.args, **self.static)
