"""The training run: config → data check → locked run folder → resume checks → model, data,
adapters → jitted guarded steps → evaluation, metrics, checkpoints → report.

The state that changes during training is `{"trainable", "opt", "step", "guard"}`: the
trainable adapter leaves (`jlora.split`) plus, for classification, the task head (`pooler`,
`classifier`), their optimizer state, and the non-finite guard's counters (`steps.py`).
Everything else (base weights, frozen adapter leaves) is rebuilt from the config
deterministically, also on resume; the per-step dropout key is `fold_in(key(seed), step)`, and
the data position is checkpointed, so a resumed run computes the very losses an uninterrupted
one does.

What a run guarantees (README, "What jlora guarantees"): data errors come before the model
loads; a folder is used by one run at a time (`guard.RunLock`); `--resume` refuses a config
that changes what the checkpoints hold, before anything is written, and records the allowed
changes in `history.jsonl`; resuming a finished run is a no-op; a non-finite step is never
applied or saved; SIGINT/SIGTERM finish the step, checkpoint and raise `guard.Interrupted`.

Several processes (hosts) run the same loop in lockstep (`jlora.train.distributed`): process 0
takes the folder's lock and writes the run's files, all of them write their checkpoint shards,
and a signal that reaches any process stops all of them at the same step.

Example (the embedded default, as `python train.py` runs it):
  >>> from jlora.train import config, loop
  >>> summary = loop.run(config.load("configs/default.yaml"), "runs/default")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from jlora.errors import ConfigError, UserError
from jlora.train import distributed, tasks
from jlora.train import guard as guard_lib
from jlora.train import steps as steps_lib
from jlora.train.checkpoint import Checkpoints, DamagedCheckpointError
from jlora.train.config import RunConfig, resume_changes, to_dict
from jlora.train.placement import shardings
from jlora.train.report import Metrics, table, write_report
from jlora.train.setup import (
    Setup,
    adapters_from_meta,
    loss_of,
    rebuilds_from_meta,
    run_mesh,
    schedule,
    spec_meta,
)

__all__ = ["RunExistsError", "Setup", "history", "run"]

log = logging.getLogger(__name__)


class RunExistsError(UserError):
    """The output folder already holds checkpoints of a run (and --resume was not given)."""


def history(out: pathlib.Path, event: str, **fields: Any) -> None:
    """Append one event (start, resume, end, stopped, failed) to `<out>/history.jsonl` (process
    0 of a multi-host run; the others write nothing)."""
    if not distributed.is_main():
        return
    row = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    with (out / "history.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _newest_meta(ckpt: Checkpoints) -> tuple[int, dict[str, Any]] | None:
    """`(step, meta)` of the newest checkpoint whose meta reads (damaged ones are skipped
    here and handled by the restore)."""
    for step in reversed(ckpt.steps()):
        try:
            return step, ckpt.read_meta(step)
        except DamagedCheckpointError:
            continue
    return None


def _check_resume(cfg: RunConfig, out: pathlib.Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The allowed config changes since the checkpoint; `ConfigError` naming the refused."""
    if "config" not in saved:
        return {}
    allowed, refused = resume_changes(saved["config"], cfg)
    if refused:
        items = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
        raise ConfigError(
            f"--resume {out}: the config changes what the checkpoints hold ({items}); resume "
            "with the run's own config, or start a new run with another --out"
        )
    return allowed


def run(
    cfg: RunConfig,
    out: str | pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    devices: Any = None,
    memory_check: bool = True,
) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `out`; returns the summary.

    Raises `UserError` subclasses (one-line messages) for bad input, `NonFiniteError` when a
    step is not finite, and `guard.Interrupted` after checkpointing on SIGINT/SIGTERM.
    `stop_after` ends the run after that many steps (checkpointing first), for tests of resume.
    `devices` are the devices of the run's mesh (default: all; `cfg.mesh` gives its shape).
    `memory_check`: before any weight is read, refuse a run whose memory plan
    (`jlora.train.plan.check_fits`) exceeds what the devices report (GPUs and TPUs; CPUs report
    nothing).

    With several processes (`cfg.distributed` or the environment, see
    `jlora.train.distributed`) every process calls `run` with the same config and `out` (a
    folder they all reach).
    """
    out = pathlib.Path(out)
    rows = tasks.read_data(cfg)  # data errors before the folder is touched or the model loads
    distributed.initialize(cfg.distributed)  # before any device is touched
    run_mesh(cfg, devices)  # and mesh errors
    if memory_check:
        from jlora.train.plan import check_fits

        fits = check_fits(cfg, jax.devices() if devices is None else list(devices))
        if fits is not None:
            log.info(
                "memory plan: about %.2f GiB per device of %.2f GiB",
                fits.estimate / 2**30,
                fits.device_memory / 2**30,
            )
    main = distributed.is_main()
    # Process 0 holds the folder for the run; the others wait until it does.
    locked = guard_lib.RunLock(out) if main else contextlib.nullcontext()
    with guard_lib.Signals() as signals, locked as lock:
        distributed.barrier("jlora: run folder locked")
        try:
            ckpt = Checkpoints(out / "checkpoints", keep=cfg.checkpoint.keep)
            try:
                return _train(cfg, out, rows, ckpt, signals, resume, progress, stop_after, devices)
            finally:
                ckpt.close()
        except BaseException:
            if main and lock.created and _holds_nothing(out):
                lock.release()
                shutil.rmtree(out, ignore_errors=True)  # a folder this run made and left empty
            raise


def _holds_nothing(out: pathlib.Path) -> bool:
    """Whether `out` holds nothing but the lock file and an empty `checkpoints/`."""
    for p in out.iterdir():
        if p.name == ".lock" or (p.name == "checkpoints" and p.is_dir() and not any(p.iterdir())):
            continue
        return False
    return True


def _train(
    cfg: RunConfig,
    out: pathlib.Path,
    rows: dict[str, list],
    ckpt: Checkpoints,
    signals: guard_lib.Signals,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    devices: Any,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    t = cfg.train
    main = distributed.is_main()
    newest = ckpt.latest_step()
    if newest is not None and not resume:
        raise RunExistsError(
            f"{out} holds checkpoints up to step {newest}: pass --resume to continue that run, "
            "or choose another --out"
        )
    saved = _newest_meta(ckpt) if resume else None
    if resume and newest is not None and saved is None:
        ckpt.restore_latest(lambda s, m: None)  # no meta reads: moves them all aside, raises
    changes: dict[str, Any] = {}
    if saved is not None:
        changes = _check_resume(cfg, out, saved[1])
        if saved[0] >= t.steps:
            log.warning(
                "%s: the run finished at step %d (train.steps=%d); nothing to do. Raise "
                "train.steps to train it further",
                out,
                saved[0],
                t.steps,
            )
            summary_path = out / "summary.json"
            done = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            return {**done, "finished": True, "steps": saved[0]}
    elif resume:
        log.warning("--resume: no checkpoint in %s; starting from step 0", out)

    rebuilt = None
    if saved is not None and rebuilds_from_meta(cfg):
        rebuilt = adapters_from_meta(saved[1], ckpt.leaf_shapes(saved[0]), cfg)
    setup = Setup(cfg, rows=rows, adapters=rebuilt, devices=devices)
    tx = setup.optimizer()
    state = setup.initial_state(tx)
    step, prior_wall = 0, 0.0
    if saved is not None:
        got = ckpt.restore_latest(lambda s, m: state)
        if got is not None:
            step, state, meta = got
            setup.data.train.restore(meta["data"])
            prior_wall = float(meta.get("wall_time_s", 0.0))
            log.info("resumed from step %d", step)
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if main:
        (out / "config.yaml").write_text(config_text)
    if saved is not None:
        changed = {k: list(v) for k, v in changes.items()}
        history(out, "resume", step=step, changes=changed)
        for k, (a, b) in changes.items():
            log.info("resume: %s changed from %r to %r", k, a, b)
    else:
        history(out, "start", step=0)
    metrics = (
        Metrics(out, resume_step=step if saved is not None else None) if main else _NoMetrics()
    )
    n_params = setup.trainable_params()
    log.info("method %s: %s trainable parameters", cfg.method, f"{n_params:,}")
    guard = steps_lib.Guard(state["trainable"], t.nonfinite, t.max_skipped_steps)
    fused, accumulate, apply = steps_lib.step_fns(
        _loss_of(setup), tx, t.nonfinite, shardings(state), setup.place.replicated
    )
    lr = schedule(cfg, t.learning_rate)
    batches = iter(setup.data.train)
    eval_metrics: dict[str, float] = {}
    last_saved = [step if saved is not None and step else None]
    specs = spec_meta(setup.initial_adapters)

    def evaluate() -> dict[str, float]:
        params, adapters = setup.assemble(state["trainable"])
        # Generation tasks also write what they generated (the main process only).
        where = out / f"predictions_step{step}.jsonl" if main and cfg.task != "sst2" else None
        res = tasks.evaluate(
            cfg, setup.model, setup.tokenizer, setup.data, params, adapters, predictions=where
        )
        return {f"eval/{k}": v for k, v in res.items()}

    def save() -> None:
        guard.check(state, last_saved[0])
        meta = {
            "step": step,
            "data": setup.data.train.state(),
            "seed": t.seed,
            "config": to_dict(cfg),
            "adapters": specs,
            "wall_time_s": round(prior_wall + time.perf_counter() - start_time, 1),
        }
        ckpt.save(step, state, meta)
        last_saved[0] = step

    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not (progress and main),
        dynamic_ncols=True,
        mininterval=1.0,
        desc=cfg.name,
    )
    window_start, window_examples = time.perf_counter(), 0
    try:
        with signals.deferred():
            while step < t.steps:
                if t.grad_accum == 1:
                    batch = setup.batch(next(batches))
                    state, m = fused(state, setup.frozen, batch)
                else:
                    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
                    acc = (zeros, jax.device_put(jnp.float32(0), setup.place.replicated))
                    for micro in range(t.grad_accum):
                        batch = setup.batch(next(batches))
                        acc = accumulate(acc, state, setup.frozen, batch, micro)
                    state, m = apply(state, acc, t.grad_accum)
                step += 1
                window_examples += t.batch_size
                bar.update(1)
                if step % t.log_every == 0 or step == t.steps:
                    skipped = guard.check(state, last_saved[0])
                    rate = window_examples / max(time.perf_counter() - window_start, 1e-9)
                    window_start, window_examples = time.perf_counter(), 0
                    row = {
                        "loss": float(m["loss"]),
                        "lr": float(lr(step - 1)),
                        "grad_norm": float(m["grad_norm"]),
                        "examples_per_s": rate,
                    }
                    row = {k: v for k, v in row.items() if math.isfinite(v)}
                    if skipped:
                        row["skipped_steps"] = skipped
                    metrics.write(step, row)
                    if "loss" in row:
                        bar.set_postfix(
                            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ex_s=f"{rate:.0f}"
                        )
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    guard.check(state, last_saved[0])
                    eval_metrics = evaluate()
                    metrics.write(step, eval_metrics)
                    if main:
                        bar.write(
                            f"step {step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                        )
                every = cfg.checkpoint.every
                if (every and step % every == 0) or step == t.steps:
                    save()
                # A signal to any process stops all of them at this step (each would otherwise
                # wait forever in the other's next collective).
                if distributed.any_process(signals.received is not None):
                    received = signals.received or int(signal.SIGTERM)
                    if last_saved[0] != step:
                        save()
                    history(out, "stopped", step=step, signal=received)
                    raise guard_lib.Interrupted(
                        received,
                        f"interrupted at step {step}; checkpoint {step} written to "
                        f"{out / 'checkpoints'}; continue with --resume",
                    )
                if stop_after is not None and step >= stop_after and step < t.steps:
                    if last_saved[0] != step:
                        save()
                    return {"stopped_at": step}
    except UserError as e:
        with contextlib.suppress(OSError):  # e.g. the disk that failed the checkpoint is full
            history(out, "failed", step=step, reason=str(e))
        raise
    finally:
        bar.close()
        metrics.close()
    wall = prior_wall + time.perf_counter() - start_time
    summary = {
        "name": cfg.name,
        "method": cfg.method,
        "trainable_params": n_params,
        **eval_metrics,
        "wall_time_s": round(wall, 1),
        "steps": t.steps,
    }
    if main:
        write_report(out, summary, config_text)
        history(out, "end", step=step)
        print(table([summary]))
    return summary


class _NoMetrics:
    """`Metrics` of a process that writes no files (not process 0 of a multi-host run)."""

    def write(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _loss_of(setup: Setup) -> Any:
    """`loss(trainable, frozen, batch, step)` of the jitted steps (`setup.loss_of`)."""
    return loss_of(setup.cfg, setup.model, setup.dtype)
