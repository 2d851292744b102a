"""What a run rebuilds from its config: model, data, adapters, trainable state and optimizer.

`Setup(cfg)` loads the model and tokenizer, builds the task's data, makes the adapters
(`jlora.init`; after the gradient pre-pass for methods with `needs_grads`) and splits them into
the trainable state and the frozen rest. Everything here is deterministic in the config, which is
why checkpoints hold only the trainable state. Adapters whose init needs the pre-pass but whose
every leaf trains and who keep the frozen kernel (GoRA, `rebuilds_from_meta`) are instead rebuilt
from a checkpoint's specs (`adapters_from_meta`), so resume and export need neither the pre-pass
nor the training data.

Example (a tiny GSM8K run on the stories260K fixture):
  >>> from jlora.train import config
  >>> cfg = config.from_dict({"task": "gsm8k", "model": {"source":
  ...     "tests/fixtures/stories260K/stories260K.bin"}, "adapter": {"method": "lora"}})
  >>> s = Setup(cfg, need_data=False)  # doctest: +SKIP
  >>> sorted(s.trainable)  # doctest: +SKIP
  ['adapters', 'head']
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jlora
import jlora.models as jm
from jlora import persist, quant, sharding
from jlora.errors import ConfigError
from jlora.methods import METHODS, Adapter
from jlora.models import scan
from jlora.train import tasks
from jlora.train.config import QUANTIZE, RunConfig, check_adapter
from jlora.train.placement import Placement
from jlora.train.steps import new_guard

log = logging.getLogger(__name__)


def needs_grads(cfg: RunConfig) -> bool:
    """Whether the run's method reads gradients of a pre-pass over training data at init."""
    return not cfg.train.full_finetune and METHODS[cfg.method].needs_grads


def rebuilds_from_meta(cfg: RunConfig) -> bool:
    """Whether resume and export rebuild the initial adapters from a checkpoint's specs instead
    of re-running the pre-pass: a method that needs gradients, every leaf of which trains (so the
    checkpoint holds it) and that leaves the frozen kernel as it is (GoRA)."""
    if not needs_grads(cfg):
        return False
    method = METHODS[cfg.method]
    options = check_adapter(cfg).options
    return not method.residual(options)


def rewrites_kernels(cfg: RunConfig) -> bool:
    """Whether the run's init rewrites the base kernels (a residual: PiSSA, LoRA-GA, residual
    NLoRA / IntTune), so it must read them in full precision before they are quantized."""
    if cfg.train.full_finetune:
        return False
    return METHODS[cfg.method].residual(check_adapter(cfg).options)


def _has_quantized(params: Any) -> bool:
    return any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))


def schedule(cfg: RunConfig, peak: float) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine / linear decay to `final_lr_ratio × peak`, or
    constant.

    Example:
      >>> from jlora.train.config import from_dict
      >>> cfg = from_dict({"train": {"steps": 10, "final_lr_ratio": 0.1}})
      >>> [round(float(schedule(cfg, 1.0)(s)), 4) for s in (0, 5, 10)]
      [1.0, 0.55, 0.1]
    """
    t = cfg.train
    decay_steps = max(t.steps - t.warmup_steps, 1)
    end = peak * t.final_lr_ratio
    decay = {
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=t.final_lr_ratio),
        "linear": optax.linear_schedule(peak, end, decay_steps),
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
    targets = cfg.adapter.get("targets", "attention")
    if isinstance(targets, str) and targets in ("attention", "all-linear"):
        targets = jm.preset(model, targets)
    return check_adapter(cfg, targets)


def spec_meta(adapters: Mapping[str, Adapter]) -> dict[str, Any]:
    """`{path: spec as JSON}`: what a checkpoint records of each adapter."""
    return {p: persist.spec_to_json(a.spec) for p, a in adapters.items()}


def adapters_from_meta(
    meta: Mapping[str, Any], leaf_shapes: Mapping[str, tuple[int, ...]], cfg: RunConfig
) -> dict[str, Adapter] | None:
    """Adapters with a checkpoint's specs and zero leaves of its saved shapes (the values come
    from the checkpoint itself), for methods whose every leaf trains; None when the
    checkpoint records no specs (written before self-describing checkpoints)."""
    specs = meta.get("adapters")
    if not specs:
        return None
    acfg = check_adapter(cfg)
    out = {}
    for path, data in specs.items():
        spec = persist.spec_from_json(data, path, acfg)
        prefix = f"trainable/adapters/{path}/params/"
        leaves = {
            name: jnp.zeros(leaf_shapes[prefix + name], jnp.float32) for name in spec.trainable
        }
        out[path] = Adapter(params=leaves, spec=spec)
    return out


class Setup:
    """Everything a run (and its export) rebuilds from the config.

    Args:
      cfg: the run config.
      need_data: build the task's data (training and resume; export needs none).
      rows: the raw rows `tasks.read_data(cfg)` returned, so they are not read twice.
      adapters: initial adapters to use instead of `jlora.init` (a GoRA run rebuilt from its
        checkpoint's specs: `adapters_from_meta`); only where `rebuilds_from_meta(cfg)`.
      devices: the devices of the run's mesh (default: all; `cfg.mesh` gives its shape).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        need_data: bool = True,
        rows: Mapping[str, list] | None = None,
        adapters: dict[str, Adapter] | None = None,
        devices: Any = None,
    ) -> None:
        self.cfg = cfg
        t = cfg.train
        mesh = run_mesh(cfg, devices, check_batch=need_data)
        self.dtype = dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
        num_labels = len(tasks.SST2_LABELS) if cfg.task == "sst2" else None
        fmt = cfg.model.quantize
        # Quantize as the checkpoint is read, except where an init rewrites the kernels: those
        # start from full precision and their residual is quantized after (QPiSSA).
        loftq = cfg.model.loftq_iters
        at_load = fmt != "none" and (fmt == "gguf" or not (rewrites_kernels(cfg) or loftq))
        log.info("loading %s%s", cfg.model.source, f" ({fmt} kernels)" if at_load else "")
        self.model, params, self.tokenizer = jm.load(
            cfg.model.source,
            dtype=dtype,
            num_labels=num_labels,
            key=jax.random.key(t.seed),
            require_tokenizer=True,
            mesh=mesh,  # each tensor straight into its layout: never whole on one device
            quantize=fmt if at_load else None,
        )
        if fmt != "none" and cfg.method in ("nlora", "inttune") and rewrites_kernels(cfg):
            log.warning(
                "model.quantize=%s with the Nyström residual (nlora_core='pinv'): its ΔK is "
                "several times K, and so is the quantization error of the residual (5-6x plain "
                "quantization's on MiniLM and SmolLM2; BENCHMARKS.md j)",
                fmt,
            )
        if fmt == "gguf" and not _has_quantized(params):
            raise ConfigError(
                f"model.quantize='gguf' keeps a .gguf file's Q4_0/Q4_1/Q8_0 blocks; "
                f"model.source={cfg.model.source!r} has none: use one of {QUANTIZE[2:]}"
            )
        self.model = self.model.clone(remat=cfg.model.remat)
        if cfg.model.scan_layers:  # stacked weights, one compiled layer (jlora.models.scan)
            self.model, params = scan.scanned(self.model, params)
        self.place = Placement(mesh, jm.sharding_rules(self.model))
        params = self.place.base(params)
        self.data = tasks.build_data(cfg, self.tokenizer, t.seed, rows=rows) if need_data else None
        self.loss = tasks.loss_fn(cfg, self.model)
        self.original = params
        self.acfg = None
        self.initial_adapters: dict = {}
        if t.full_finetune:
            self.trainable = self.place.base(
                {"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)}
            )
            self.frozen: dict[str, Any] = {"adapters": {}, "base": {}}
            return
        self.acfg = adapter_config(cfg, self.model)
        if adapters is not None:
            if not rebuilds_from_meta(cfg):
                raise ValueError(f"adapters= is not for method {self.acfg.method!r}")
            base = params
        else:
            grads = self._prepass(params) if needs_grads(cfg) else None
            key = jax.random.key(t.seed)
            if loftq and not at_load:  # the init and its alternation on full precision
                base, adapters = quant.loftq.init(
                    self.acfg, params, key, fmt=fmt, iters=loftq, pattern=jm.QUANTIZE_PATTERN
                )
                log.info("LoftQ: %d alternations of the %s base and the adapters", loftq, fmt)
            else:
                base, adapters = jlora.init(
                    self.acfg, params, key, grads=grads, layouts=self.layouts(params)
                )
        base = self.place.base(base)  # an init may have rewritten it (PiSSA's residual)
        adapters = self.place.adapters(adapters, base)
        self.initial_adapters = adapters
        head_names = [k for k in tasks.HEAD_MODULES if k in base] if self._train_head else []
        head = {k: jax.tree.map(lambda x: x.astype(jnp.float32), base[k]) for k in head_names}
        trainable, frozen = jlora.split(adapters)
        self.trainable = {"adapters": trainable, "head": head}
        frozen_base = {k: v for k, v in base.items() if k not in head_names}
        if fmt != "none" and not at_load and not loftq:  # the init read full precision
            frozen_base = quant.quantize_params(frozen_base, fmt, jm.QUANTIZE_PATTERN)
            frozen_base = self.place.base(frozen_base)
            log.info("frozen base kernels (the residual) quantized as %s", fmt)
        self.frozen = {"adapters": frozen, "base": frozen_base}

    def layouts(self, params: Any) -> dict[str, jlora.KernelLayout] | None:
        """The kernel layouts of a scanned model's stacked kernels (None: unrolled)."""
        return jlora.stacked_layouts(params) if self.cfg.model.scan_layers else None

    def unscanned(self, params: Any, adapters: Any) -> tuple[Any, Any, Any]:
        """`(model, params, adapters)` in the per-layer layout (exports, generation): the
        unrolled model with unstacked weights and per-layer adapters when the run scans its
        layers, else the run's own."""
        if not self.cfg.model.scan_layers:
            return self.model, params, adapters
        model, params = scan.unscanned(self.model, params)
        return model, params, self.per_layer(adapters)

    def per_layer(self, adapters: Any) -> Any:
        """`adapters` of the per-layer layout (`jlora.models.scan.unstack_adapters` when the run
        scans its layers)."""
        if not self.cfg.model.scan_layers:
            return adapters
        return scan.unstack_adapters(adapters, *scan.layers_of(self.model))

    @property
    def _train_head(self) -> bool:
        return self.cfg.task == "sst2" and self.cfg.train.train_head

    def _prepass(self, params: Any) -> Any:
        """The gradient statistics over `train.prepass_batches` training micro-batches."""
        n = self.cfg.train.prepass_batches
        method = self.cfg.method
        if self.data is None:
            raise ValueError(f"{method}'s pre-pass needs the training data (need_data=True)")
        if n == 0:
            raise ValueError(f"adapter.method={method!r} needs train.prepass_batches >= 1")
        pre = self.data.prepass_batches(seed=self.cfg.train.seed + 1)
        log.info("%s pre-pass over %d micro-batches", method, n)

        def plain(p, batch):
            return self.loss(p, {}, batch, None)

        batches = (self.place.batch(b) for b in itertools.islice(iter(pre), n))
        return jlora.gradient_stats(plain, params, batches, self.acfg, log_every=max(n // 4, 1))

    def assemble(self, trainable: Any, frozen: Any = None) -> tuple[Any, Any]:
        """`(params, adapters)` the model runs with, from the trainable state (and `frozen`, by
        default `self.frozen`; jitted steps pass it as an argument)."""
        frozen = self.frozen if frozen is None else frozen
        return assemble(trainable, frozen, self.dtype)

    def optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.cfg, self.trainable)

    def initial_state(self, tx: optax.GradientTransformation) -> dict[str, Any]:
        """The training state at step 0 (also the `like` tree of a restore)."""
        state = {
            "trainable": self.trainable,
            "opt": tx.init(self.trainable),  # zeros_like: each moment keeps its leaf's layout
            "step": jnp.zeros((), jnp.int32),
            "guard": new_guard(),
        }
        return self.place.state(state)

    def batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A host batch on the mesh (split over data × fsdp)."""
        return self.place.batch(batch)

    def trainable_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))


def assemble(trainable: Any, frozen: Any, dtype: Any) -> tuple[Any, Any]:
    """`(params, adapters)` the model runs with, from the trainable state and the frozen rest
    (full fine-tuning: the fp32 parameters cast to the model's `dtype`)."""
    if "params" in trainable:
        return jax.tree.map(lambda x: x.astype(dtype), trainable["params"]), {}
    params = {**frozen["base"], **trainable["head"]}
    return params, jlora.combine(trainable["adapters"], frozen["adapters"])


def optimizer(cfg: RunConfig, trainable: Any) -> optax.GradientTransformation:
    """The run's optimizer over its trainable state (`{"params"}` for full fine-tuning, else
    `{"adapters", "head"}`): clipping, then AdamW per key, adapters through `jlora.optimizer`
    (frozen leaves get no state; per-leaf learning-rate ratios such as GoRA's B)."""
    t = cfg.train
    lr = schedule(cfg, t.learning_rate)
    txs: dict[str, optax.GradientTransformation] = {}
    if "params" in trainable:
        txs["params"] = optax.adamw(lr, weight_decay=t.weight_decay)
    else:
        txs["adapters"] = jlora.optimizer(
            trainable["adapters"],
            optax.adam(lr),
            weight_decay=t.weight_decay,
            learning_rate=lr,
        )
        head_lr = schedule(cfg, t.head_learning_rate or t.learning_rate)
        txs["head"] = optax.adamw(head_lr, weight_decay=t.weight_decay)
    parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm else []
    return optax.chain(*parts, by_key(txs))


def loss_of(cfg: RunConfig, model: Any, dtype: Any) -> Any:
    """`loss(trainable, frozen, batch, step)` of the jitted steps, for the run's model computing
    in `dtype` (dropout keys fold in the step).

    The frozen base is an argument of the jitted steps, not a closure: closed-over arrays
    become constants of the program, and the MiniLM LoRA step compiled 1.5x slower that way
    (6.4 s vs 4.2 s; same step time).
    """
    loss = tasks.loss_fn(cfg, model)
    dropout = 0.0 if cfg.train.full_finetune else float(cfg.adapter.get("dropout", 0.0) or 0.0)
    key = jax.random.key(cfg.train.seed)

    def loss_of(trainable, frozen, batch, step):
        params, adapters = assemble(trainable, frozen, dtype)
        rng = jax.random.fold_in(key, step) if dropout else None
        return loss(params, adapters, batch, rng)

    return loss_of


def run_mesh(cfg: RunConfig, devices: Any = None, *, check_batch: bool = True) -> Mesh:
    """The run's mesh over `devices` (default: all); `ConfigError` naming the field when the
    `mesh` section does not fit the devices or (`check_batch`) the micro-batch does not split
    over it."""
    devices = jax.devices() if devices is None else list(devices)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"{e} ({len(devices)} {devices[0].platform} devices)") from e
    t = cfg.train
    micro, n = t.batch_size // t.grad_accum, Placement(mesh, ()).batch_divisor
    if check_batch and micro % n:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (micro-batches of {micro} with train.grad_accum="
            f"{t.grad_accum}): expected micro-batches that split over mesh.data × mesh.fsdp = "
            f"{n} devices (a multiple of {n})"
        )
    return mesh
