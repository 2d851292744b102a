"""`train.py export`: a finished (or interrupted) run as jlora adapters, a PEFT LoRA folder, or
a merged Hugging Face model.

The run folder holds orbax checkpoints that record their resolved config and adapter specs; the
export rebuilds the model and the initial adapters from them (deterministic, as on resume; no
training data, no GoRA pre-pass), restores the newest good checkpoint (checksum and
finiteness verified) and writes:
- `jlora`: `jlora.persist.save_adapters` (NOLA: coefficients and seeds only), with the trained
  head; `jlora.persist.load_adapters` reads it back to continue or merge;
- `peft`: `jlora.interop.peft.to_peft` (residual methods use the recomputed initial adapters), the
  head as PEFT's `modules_to_save`;
- `merged`: `jlora.merge` plus the head, through `jlora.models.save_hf` (e.g. a
  `BertForSequenceClassification` folder for the SST-2 runs).

Example:
  >>> from jlora.train.export import export_run
  >>> export_run("runs/default", "peft", "exports/default-peft")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

import jlora
import jlora.models as jm
from jlora import persist
from jlora.errors import CheckpointError
from jlora.interop import peft as jpeft
from jlora.train import config as config_lib
from jlora.train.checkpoint import Checkpoints, DamagedCheckpointError

log = logging.getLogger(__name__)
FORMATS = ("jlora", "peft", "merged")


def restore_run(run: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """`(setup, trainable, meta)`: the rebuilt run and its newest good trained state.

    The config is the one the checkpoint records (`config.yaml` for checkpoints that predate
    self-describing ones); a damaged or non-finite newest checkpoint is skipped for the one
    before it (the run folder is not changed). Needs neither the training data nor GoRA's
    pre-pass: GoRA's adapters are rebuilt from the checkpoint's specs.
    """
    from jlora.train.setup import Setup, adapters_from_meta, needs_grads, rebuilds_from_meta

    run = pathlib.Path(run)
    if not (run / "checkpoints").is_dir():
        raise CheckpointError(f"--run {run}: no checkpoints/ folder (not a train.py run folder)")
    ckpt = Checkpoints(run / "checkpoints")
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"--run {run}: no complete checkpoint to export")
        meta = None
        for step in reversed(steps):
            try:
                meta = ckpt.read_meta(step)
                break
            except DamagedCheckpointError as e:
                log.warning("%s; trying an earlier checkpoint", e)
        if meta is None:
            raise CheckpointError(f"--run {run}: every checkpoint is damaged ({steps})")
        if "config" in meta:
            cfg = config_lib.from_dict(meta["config"])
        else:
            cfg = config_lib.load(run / "config.yaml")
        cfg = _fitting_mesh(cfg)
        rebuilt = None
        if rebuilds_from_meta(cfg):
            rebuilt = adapters_from_meta(meta, ckpt.leaf_shapes(step), cfg)
        setup = Setup(cfg, need_data=rebuilt is None and needs_grads(cfg), adapters=rebuilt)
        like = setup.initial_state(setup.optimizer())
        got = ckpt.restore_latest(lambda s, m: like, quarantine=False)
    finally:
        ckpt.close()
    assert got is not None
    _, state, meta = got
    return setup, state["trainable"], meta


def _fitting_mesh(cfg: config_lib.RunConfig) -> config_lib.RunConfig:
    """`cfg` with a mesh that fits this process's devices: the run's own when it does (a run
    trained on 8 devices exported on 8), else FSDP over all of them (a multi-host run exported
    on one host, or on one GPU)."""
    from jlora.sharding import MeshShape

    devices = jax.device_count()
    try:
        cfg.mesh.resolve(devices)
        return cfg
    except ValueError:
        log.info("the run's mesh %s does not fit %d devices: FSDP over them", cfg.mesh, devices)
        return dataclasses.replace(cfg, mesh=MeshShape(data=1, fsdp=-1))


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike) -> pathlib.Path:
    """Write run `run` in format `fmt` ("jlora", "peft" or "merged") to folder `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {FORMATS}")
    setup, trainable, meta = restore_run(run)
    out = pathlib.Path(out)
    params, adapters = setup.assemble(trainable)
    # A run that scanned its layers exports the per-layer layout, as an unscanned run does.
    model, params, adapters = setup.unscanned(params, adapters)
    initial = setup.per_layer(setup.initial_adapters)
    head = trainable.get("head") or None
    info = {"run": str(run), "step": meta["step"], "method": setup.cfg.method}
    if fmt == "merged":
        # A base kept quantized merges into its dequantized kernels (jlora.merge's full-precision
        # result): the model that trained.
        merged = jlora.merge(params, adapters) if adapters else params
        if head:
            merged = {**merged, **jax.tree.map(lambda x: x.astype(jnp.float32), head)}
        path = jm.save_hf(out, model, merged, setup.tokenizer)
    elif setup.acfg is None:
        raise ValueError(f"--format {fmt}: a full fine-tune has no adapters; use --format merged")
    elif fmt == "jlora":
        path = persist.save_adapters(out, adapters, setup.acfg, extra_params=head, metadata=info)
    else:
        path = jpeft.to_peft(
            model,
            adapters,
            out,
            initial_adapters=initial,
            rewritten=setup.cfg.model.loftq_iters > 0,  # LoftQ rewrote every target's kernel
            extra_params=head,
            base_model_name_or_path=setup.cfg.model.source,
        )
    log.info("exported %s (step %d) as %s to %s", run, meta["step"], fmt, path)
    return path
