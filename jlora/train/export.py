"""`train.py export`: a finished (or interrupted) run as jlora adapters, a PEFT LoRA folder, or
a merged Hugging Face model.

The run folder holds the resolved `config.yaml` and orbax checkpoints; the export rebuilds the
model and the initial adapters from the config (deterministic, as on resume), restores the
latest checkpoint and writes:
- `jlora`: `jlora.export.save_adapters` (NOLA: coefficients and seeds only), with the trained
  head; `jlora.export.load_adapters` reads it back to continue or merge;
- `peft`: `jlora.export.to_peft` (residual methods use the recomputed initial adapters), the
  head as PEFT's `modules_to_save`;
- `merged`: `jlora.merge` plus the head, through `jlora.models.save_hf` (e.g. a
  `BertForSequenceClassification` folder for the SST-2 runs).

Example:
  >>> from jlora.train.export import export_run
  >>> export_run("runs/default", "peft", "exports/default-peft")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

import jlora
import jlora.models as jm
from jlora import export as jexport
from jlora.train import config as config_lib
from jlora.train.checkpoint import Checkpoints

log = logging.getLogger(__name__)
FORMATS = ("jlora", "peft", "merged")


def restore_run(run: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """`(setup, trainable, meta)`: the rebuilt run and its latest trained state."""
    from jlora.train.loop import Setup

    run = pathlib.Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"--run {run}: no config.yaml (not a train.py run folder)")
    cfg = config_lib.load(run / "config.yaml")
    ckpt = Checkpoints(run / "checkpoints", keep=cfg.checkpoint.keep)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"--run {run}: no complete checkpoint to export")
    # GoRA's init needs its gradient pre-pass, hence the data; other methods do not.
    setup = Setup(cfg, need_data=cfg.method == "gora")
    tx = setup.optimizer()
    like = {
        "trainable": setup.trainable,
        "opt": tx.init(setup.trainable),
        "step": jnp.zeros((), jnp.int32),
    }
    state, meta = ckpt.restore(step, like)
    ckpt.close()
    return setup, state["trainable"], meta


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike) -> pathlib.Path:
    """Write run `run` in format `fmt` ("jlora", "peft" or "merged") to folder `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {FORMATS}")
    setup, trainable, meta = restore_run(run)
    out = pathlib.Path(out)
    params, adapters = setup.assemble(trainable)
    head = trainable.get("head") or None
    info = {"run": str(run), "step": meta["step"], "method": setup.cfg.method}
    if fmt == "merged":
        merged = jlora.merge(params, adapters) if adapters else params
        if head:
            merged = {**merged, **jax.tree.map(lambda x: x.astype(jnp.float32), head)}
        path = jm.save_hf(out, setup.model, merged, setup.tokenizer)
    elif setup.acfg is None:
        raise ValueError(f"--format {fmt}: a full fine-tune has no adapters; use --format merged")
    elif fmt == "jlora":
        path = jexport.save_adapters(out, adapters, setup.acfg, extra_params=head, metadata=info)
    else:
        path = jexport.to_peft(
            setup.model,
            adapters,
            out,
            initial_adapters=setup.initial_adapters,
            extra_params=head,
            base_model_name_or_path=setup.cfg.model.source,
        )
    log.info("exported %s (step %d) as %s to %s", run, meta["step"], fmt, path)
    return path
