"""The training run: config → model + tokenizer → data → (GoRA pre-pass) → adapters →
optimizer → jitted steps with donated state → evaluation, metrics, checkpoints → report.

The state that changes during training is `{"trainable", "opt", "step"}`: the trainable adapter
leaves (`jlora.split`) plus, for classification, the task head (`pooler`, `classifier`), and
their optimizer state. Everything else (base weights, frozen adapter leaves) is rebuilt from
the config deterministically, also on resume; the per-step dropout key is
`fold_in(key(seed), step)`, and the data position is checkpointed, so a resumed run computes
the very losses an uninterrupted one does.

Example (the embedded default, as `python train.py` runs it):
  >>> from jlora.train import config, loop
  >>> summary = loop.run(config.load("configs/default.yaml"), "runs/default")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import jlora
import jlora.models as jm
from jlora.train import tasks
from jlora.train.checkpoint import Checkpoints
from jlora.train.config import RunConfig, to_dict
from jlora.train.report import Metrics, table, write_report

log = logging.getLogger(__name__)


class RunExistsError(RuntimeError):
    """The output folder already holds checkpoints of a run (and --resume was not given)."""


def schedule(cfg: RunConfig, peak: float) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine / linear decay to 0 or constant."""
    t = cfg.train
    decay_steps = max(t.steps - t.warmup_steps, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[t.schedule]
    if not t.warmup_steps:
        return decay
    warm = optax.linear_schedule(0.0, peak, t.warmup_steps)
    return optax.join_schedules([warm, decay], [t.warmup_steps])


def by_key(txs: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One transform per top-level key of a dict of parameters (each sees only its subtree,
    unlike `optax.partition`, whose inner transforms see the whole masked tree)."""

    def init(params):
        return {k: tx.init(params[k]) for k, tx in txs.items()}

    def update(updates, state, params=None):
        out, new_state = {}, {}
        for k, tx in txs.items():
            out[k], new_state[k] = tx.update(
                updates[k], state[k], None if params is None else params[k]
            )
        return out, new_state

    return optax.GradientTransformation(init, update)


def adapter_config(cfg: RunConfig, model: Any) -> jlora.AdapterConfig:
    """`jlora.AdapterConfig` of the `adapter` section; preset names become the model's regex."""
    kwargs = dict(cfg.adapter)
    targets = kwargs.get("targets", "attention")
    if isinstance(targets, str) and targets in ("attention", "all-linear"):
        kwargs["targets"] = jm.preset(model, targets)
    for key in ("nola_num_basis", "gora_rank_range"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    kwargs.setdefault("seed", cfg.train.seed)
    try:
        return jlora.AdapterConfig(**kwargs)
    except TypeError as e:
        raise ValueError(f"adapter: {e}") from e


class Setup:
    """Everything a run (and its export) rebuilds from the config."""

    def __init__(self, cfg: RunConfig, *, need_data: bool = True) -> None:
        self.cfg = cfg
        t = cfg.train
        dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
        num_labels = 2 if cfg.task == "sst2" else None
        log.info("loading %s", cfg.model.source)
        self.model, params, self.tokenizer = jm.load(
            cfg.model.source, dtype=dtype, num_labels=num_labels, key=jax.random.key(t.seed)
        )
        if self.tokenizer is None:
            raise ValueError(f"model.source={cfg.model.source!r} has no tokenizer files")
        self.data = tasks.build_data(cfg, self.tokenizer, t.seed) if need_data else None
        self.loss = tasks.loss_fn(cfg, self.model)
        self.original = params
        self.acfg = None
        self.initial_adapters: dict = {}
        if t.full_finetune:
            self.trainable = {"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)}
            self.frozen: dict[str, Any] = {"adapters": {}, "base": {}}
            return
        self.acfg = adapter_config(cfg, self.model)
        grads = self._gora_prepass(params) if self.acfg.method == "gora" else None
        base, adapters = jlora.init(self.acfg, params, jax.random.key(t.seed), grads=grads)
        self.initial_adapters = adapters
        head_names = [k for k in tasks.HEAD_MODULES if k in base] if self._train_head else []
        head = {k: jax.tree.map(lambda x: x.astype(jnp.float32), base[k]) for k in head_names}
        trainable, frozen = jlora.split(adapters)
        self.trainable = {"adapters": trainable, "head": head}
        self.frozen = {
            "adapters": frozen,
            "base": {k: v for k, v in base.items() if k not in head_names},
        }

    @property
    def _train_head(self) -> bool:
        return self.cfg.task == "sst2" and self.cfg.train.train_head

    def _gora_prepass(self, params: Any) -> Any:
        """GoRA's gradient statistics over `gora_prepass_batches` training micro-batches."""
        import itertools

        n = self.cfg.train.gora_prepass_batches
        if self.data is None or n == 0:
            raise ValueError("adapter.method='gora' needs train.gora_prepass_batches >= 1")
        pre = self.data.prepass_batches(seed=self.cfg.train.seed + 1)
        log.info("GoRA pre-pass over %d micro-batches", n)

        def plain(p, batch):
            return self.loss(p, {}, batch, None)

        batches = (jax.tree.map(jnp.asarray, b) for b in itertools.islice(iter(pre), n))
        return jlora.gradient_stats(plain, params, batches, self.acfg, log_every=max(n // 4, 1))

    def assemble(self, trainable: Any, frozen: Any = None) -> tuple[Any, Any]:
        """`(params, adapters)` the model runs with, from the trainable state (and `frozen`, by
        default `self.frozen`; jitted steps pass it as an argument)."""
        frozen = self.frozen if frozen is None else frozen
        if "params" in trainable:
            dtype = jax.tree.leaves(self.original)[0].dtype
            return jax.tree.map(lambda x: x.astype(dtype), trainable["params"]), {}
        params = {**frozen["base"], **trainable["head"]}
        return params, jlora.combine(trainable["adapters"], frozen["adapters"])

    def optimizer(self) -> optax.GradientTransformation:
        t = self.cfg.train
        lr = schedule(self.cfg, t.learning_rate)
        txs: dict[str, optax.GradientTransformation] = {}
        if "params" in self.trainable:
            txs["params"] = optax.adamw(lr, weight_decay=t.weight_decay)
        else:
            txs["adapters"] = jlora.optimizer(
                self.trainable["adapters"],
                optax.adam(lr),
                weight_decay=t.weight_decay,
                learning_rate=lr,
            )
            head_lr = schedule(self.cfg, t.head_learning_rate or t.learning_rate)
            txs["head"] = optax.adamw(head_lr, weight_decay=t.weight_decay)
        parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm else []
        return optax.chain(*parts, by_key(txs))

    def trainable_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))


def _step_fns(setup: Setup, tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """`(fused_step, (accumulate, apply))`: jitted with the state donated."""
    cfg = setup.cfg
    dropout = float(cfg.adapter.get("dropout", 0.0) or 0.0) if not cfg.train.full_finetune else 0.0
    key = jax.random.key(cfg.train.seed)

    # The frozen base is an argument of the jitted steps, not a closure: closed-over arrays
    # become constants of the program, and the MiniLM LoRA step compiled 1.5x slower that way
    # (6.4 s vs 4.2 s; same step time).
    def loss_of(trainable, frozen, batch, step):
        params, adapters = setup.assemble(trainable, frozen)
        rng = jax.random.fold_in(key, step) if dropout else None
        return setup.loss(params, adapters, batch, rng)

    grad = jax.value_and_grad(loss_of)

    def update(state, grads, loss):
        updates, opt = tx.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"trainable": trainable, "opt": opt, "step": state["step"] + 1}, metrics

    @functools.partial(jax.jit, donate_argnums=(0,))
    def fused(state, frozen, batch):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"])
        return update(state, grads, loss)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def accumulate(acc, state, frozen, batch, micro):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"] * 1000 + micro)
        return jax.tree.map(jnp.add, acc, (grads, loss))

    @functools.partial(jax.jit, donate_argnums=(0,))
    def apply(state, acc, n):
        grads, loss = jax.tree.map(lambda x: x / n, acc)
        return update(state, grads, loss)

    return fused, (accumulate, apply)


def _prepare(out: pathlib.Path, resume: bool, keep: int) -> tuple[Checkpoints, int | None]:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(out / "checkpoints", keep=keep)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise RunExistsError(
            f"{out} holds checkpoints up to step {latest}: pass --resume to continue that run, "
            "or choose another --out"
        )
    if resume and latest is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", out)
    return ckpt, latest


def run(
    cfg: RunConfig,
    out: str | pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `out`; returns the summary.

    `stop_after` ends the process-equivalent of an interruption after that many steps
    (checkpointing first), for tests of resume.
    """
    from tqdm.auto import tqdm

    out = pathlib.Path(out)
    start_time = time.perf_counter()
    t = cfg.train
    ckpt, latest = _prepare(out, resume, cfg.checkpoint.keep)
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (out / "config.yaml").write_text(config_text)

    setup = Setup(cfg)
    tx = setup.optimizer()
    state = {
        "trainable": setup.trainable,
        "opt": tx.init(setup.trainable),
        "step": jnp.zeros((), jnp.int32),
    }
    step = 0
    if latest is not None and resume:
        state, meta = ckpt.restore(latest, state)
        setup.data.train.restore(meta["data"])
        step = int(meta["step"])
        log.info("resumed from step %d", step)
    metrics = Metrics(out, resume_step=step if latest is not None and resume else None)
    n_params = setup.trainable_params()
    log.info("method %s: %s trainable parameters", cfg.method, f"{n_params:,}")
    fused, (accumulate, apply) = _step_fns(setup, tx)
    lr = schedule(cfg, t.learning_rate)
    batches = iter(setup.data.train)
    eval_metrics: dict[str, float] = {}

    def evaluate() -> dict[str, float]:
        params, adapters = setup.assemble(state["trainable"])
        res = tasks.evaluate(cfg, setup.model, setup.tokenizer, setup.data, params, adapters)
        return {f"eval/{k}": v for k, v in res.items()}

    def save() -> None:
        meta = {"step": step, "data": setup.data.train.state(), "seed": t.seed}
        ckpt.save(step, state, meta)

    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
        desc=cfg.name,
    )
    window_start, window_examples = time.perf_counter(), 0
    try:
        while step < t.steps:
            if t.grad_accum == 1:
                batch = jax.tree.map(jnp.asarray, next(batches))
                state, m = fused(state, setup.frozen, batch)
            else:
                acc = None
                for micro in range(t.grad_accum):
                    batch = jax.tree.map(jnp.asarray, next(batches))
                    if acc is None:
                        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
                        acc = (zeros, jnp.zeros((), jnp.float32))
                    acc = accumulate(acc, state, setup.frozen, batch, micro)
                state, m = apply(state, acc, t.grad_accum)
            step += 1
            window_examples += t.batch_size
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    save()
                    raise FloatingPointError(f"loss is {loss} at step {step}; checkpoint saved")
                rate = window_examples / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_examples = time.perf_counter(), 0
                row = {
                    "loss": loss,
                    "lr": float(lr(step - 1)),
                    "grad_norm": float(m["grad_norm"]),
                    "examples_per_s": rate,
                }
                metrics.write(step, row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", ex_s=f"{rate:.0f}")
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                eval_metrics = evaluate()
                metrics.write(step, eval_metrics)
                bar.write(
                    f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                )
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
                save()
            if stop_after is not None and step >= stop_after and step < t.steps:
                save()
                return {"stopped_at": step}
    finally:
        bar.close()
        metrics.close()
        ckpt.close()
    wall = time.perf_counter() - start_time
    summary = {
        "name": cfg.name,
        "method": cfg.method,
        "trainable_params": n_params,
        **eval_metrics,
        "wall_time_s": round(wall, 1),
        "steps": t.steps,
    }
    write_report(out, summary, config_text)
    print(table([summary]))
    return summary
