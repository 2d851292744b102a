"""A run's memory plan, from abstract shapes only: `python train.py plan --config C`.

`plan(cfg, devices=N)` builds the model (`jlora.models.abstract`: its config file alone), the
adapters (`jlora.abstract_init`) and the optimizer state (`jax.eval_shape` of its `init`) as
`jax.ShapeDtypeStruct`s, lays each leaf out on the run's mesh by the same rules training uses
(`jlora.sharding`), and reports per device:

- `base`: the frozen parameters (a trained head and full fine-tuning's parameters count as
  trainable), as `model.quantize` stores them (a quantized kernel's codes and scales);
- `adapters`: every adapter leaf, frozen ones included (VeRA's shared matrices, IntTune's
  factors), plus a trained head;
- `optimizer`: the optimizer state (Adam's two moments of every trainable leaf, fp32);
- `gradients`: one fp32 gradient of every trainable leaf (two under gradient accumulation:
  the running sum and the micro-batch's);
- `activations`: what the backward pass keeps, estimated from the model's shape, the micro-batch,
  `data.max_length` and `model.remat` (`activation_bytes`);
- `peak`: the step's peak. Where the step is compiled (by default on GPUs and TPUs whose
  devices the mesh fits; `compile=True` on CPU), XLA's memory analysis of the compiled sharded
  step (`compiled`; it allocates nothing); otherwise the sum above (`estimate`). The
  benchmarks report the estimate's error against compiled peaks (BENCHMARKS.md h).

GoRA's ranks need its gradient pre-pass: the plan counts every target as equally important,
which spends exactly the rank budget (see `jlora.abstract_init`).

Example:
  >>> from jlora.train.config import from_dict
  >>> cfg = from_dict({"task": "gsm8k", "model": {"source": "meta-llama/Llama-3.1-8B",
  ...     "dtype": "bfloat16", "remat": "full"}, "adapter": {"method": "lora", "rank": 16},
  ...     "train": {"batch_size": 8}, "mesh": {"fsdp": -1, "data": 1}})
  >>> p = plan(cfg, devices=8)
  >>> p.parameters, p.per_device["base"] * 8 >= 2 * p.parameters
  (8030261248, True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

import jlora
import jlora.models as jm
from jlora import quant, sharding
from jlora.errors import ConfigError, UserError, exception_line
from jlora.models import scan
from jlora.models.abstract import count, load_abstract
from jlora.sharding import P
from jlora.train import setup as setup_lib
from jlora.train import steps, tasks
from jlora.train.config import RunConfig

__all__ = [
    "DoesNotFitError",
    "Plan",
    "activation_bytes",
    "check_fits",
    "device_memory_of",
    "parse_bytes",
    "plan",
]

log = logging.getLogger(__name__)

GiB = 1024**3
PARTS = ("base", "adapters", "optimizer", "gradients", "activations")


class DoesNotFitError(UserError):
    """A run whose planned peak exceeds its devices' memory."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of a run (see the module docstring)."""

    # What was planned: the config's name, model source, method and the mesh's axis sizes.
    name: str
    source: str
    method: str
    devices: int
    mesh: dict[str, int]
    dtype: str
    remat: str
    # Micro-batch rows per device and the planned sequence length.
    rows_per_device: int
    seq_len: int
    # Whole-model parameter counts: the base, and what trains.
    parameters: int
    trainable: int
    # Bytes per device of each of PARTS.
    per_device: dict[str, int]
    # The gradient pre-pass of GoRA / LoRA-GA (None for other methods): the base, an fp32
    # accumulator and one micro-batch's fp32 gradient of every target kernel, and activations.
    prepass: int | None
    # The sum of PARTS (always), and XLA's compiled peak (where the step was compiled).
    estimate: int
    compiled: int | None
    compile_seconds: float | None
    # Bytes of each device, and whether `peak` fits in it (None: unknown memory).
    device_memory: int | None

    @property
    def peak(self) -> int:
        """The training step's compiled peak where there is one, else its estimate; or the
        pre-pass's, where that is higher."""
        step = self.estimate if self.compiled is None else self.compiled
        return max(step, self.prepass or 0)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak=self.peak, peak_source=self.peak_source, fits=self.fits)
        return out

    @property
    def peak_source(self) -> str:
        if self.prepass is not None and self.peak == self.prepass:
            return "pre-pass"
        return "estimate" if self.compiled is None else "compiled"

    def table(self) -> str:
        """The plan as aligned text lines."""
        mesh = " × ".join(f"{a} {n}" for a, n in self.mesh.items())
        lines = [
            f"plan: {self.name} ({self.method} on {self.source}, {self.dtype}, remat {self.remat})",
            f"  devices {self.devices}: mesh {mesh}; {self.rows_per_device} rows × "
            f"{self.seq_len} tokens per device per micro-batch",
            f"  parameters {self.parameters:,} (base), {self.trainable:,} trainable",
            "  per device:",
        ]
        for part in PARTS:
            note = " (estimate)" if part == "activations" else ""
            lines.append(f"    {part + note:<24}{_gib(self.per_device[part])}")
        lines.append(f"    {'sum (estimate)':<24}{_gib(self.estimate)}")
        if self.prepass is not None:
            lines.append(
                f"    {'pre-pass (estimate)':<24}{_gib(self.prepass)}   {self.method}'s gradient "
                "pre-pass: base, fp32 gradients of the targets (sum and step), activations"
            )
        if self.compiled is not None:
            lines.append(
                f"    {'peak (compiled)':<24}{_gib(self.compiled)}   XLA memory analysis of "
                f"the sharded step on {jax.devices()[0].platform} "
                f"({self.compile_seconds:.0f} s to compile)"
            )
        if self.device_memory is None:
            lines.append("  device memory unknown: pass --device-memory (e.g. 80GiB) to check")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"  {self.peak_source} peak {self.peak / GiB:.2f} GiB {verdict} in "
                f"{self.device_memory / GiB:.2f} GiB per device"
            )
        return "\n".join(lines)

    def write(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """Bytes of a size such as `80GiB`, `80GB` (10⁹), `81920MiB` or `85899345920`.

    Example:
      >>> parse_bytes("80GiB"), parse_bytes("1.5 kB")
      (85899345920, 1500)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"device memory {text!r} is invalid: expected a positive size such as 80GiB, 80GB, "
            "81920MiB or a byte count"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def device_memory_of(devices: list[Any]) -> int | None:
    """The memory XLA may use on each of `devices` (their smallest `bytes_limit`), or None where
    the backend reports none (CPU)."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # a backend without allocator statistics
            return None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def _local_bytes(shape: tuple[int, ...], dtype: Any, spec: P, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array of `shape` laid out by `spec`."""
    n = 1
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        names = () if axis is None else (axis,) if isinstance(axis, str) else axis
        n *= -(-dim // math.prod(sizes[a] for a in names))
    return n * jnp.dtype(dtype).itemsize


def _tree_bytes(tree: Any, specs: Any, sizes: Mapping[str, int]) -> int:
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return sum(
        _local_bytes(tuple(x.shape), x.dtype, s, sizes)
        for x, s in zip(leaves, spec_leaves, strict=True)
    )


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _state_specs(state: Any, trainable: Any, specs: Any) -> list[tuple[Any, P]]:
    """`(leaf, spec)` of every optimizer-state leaf: the spec of the trainable leaf its path
    ends with (optax keeps each moment in its leaf's layout), replicated for the rest."""
    by_suffix: dict[tuple[str, ...], P] = {}
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, _), spec in zip(jax.tree.leaves_with_path(trainable), flat_specs, strict=True):
        keys = _keys(path)
        for i in range(len(keys)):
            by_suffix.setdefault(keys[i:], spec)
    out = []
    for path, leaf in jax.tree.leaves_with_path(state):
        keys = _keys(path)
        spec = next((by_suffix[keys[i:]] for i in range(len(keys)) if keys[i:] in by_suffix), P())
        out.append((leaf, spec if len(spec) <= len(leaf.shape) else P()))
    return out


def activation_bytes(model: Any, rows: int, seq_len: int, remat: str, task: str) -> int:
    """Bytes the backward pass keeps per device, estimated from the model's shape: per layer and
    token, the activations a layer saves (`none`), its matmul outputs (`dots`) or its input alone
    plus one layer's recomputation (`full`), and the float32 logits with their log-softmax and
    gradient. Calibrated against XLA's compiled peaks (benchmarks/plan_cost.py)."""
    c = model.config
    itemsize = jnp.dtype(model.dtype).itemsize
    if c.model_type == "gpt2":  # GPT2Config's own names
        h, inter, layers, heads = c.n_embd, c.inner_dim, c.n_layer, c.n_head
    else:
        h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        heads = c.num_attention_heads
    if c.model_type in ("bert", "roberta", "gpt2"):
        q = kv = h
    else:
        hd = c.head_dim or h // heads
        q, kv = heads * hd, (c.num_key_value_heads or heads) * hd
    tokens = rows * seq_len
    # Attention scores and probabilities are float32 ([heads, seq] per token), plus the probs
    # in the compute dtype for the value matmul.
    scores = heads * seq_len * (4 + 4 + itemsize)
    dots = (2 * h + 2 * q + 2 * kv + 3 * inter) * itemsize + scores
    every = dots + (h + inter) * itemsize  # norm outputs, the MLP activation
    if remat == "full":
        kept = layers * h * itemsize + every
    elif remat == "dots":
        kept = layers * dots + every
    else:
        kept = layers * every
    vocab = getattr(c, "vocab_size", 0) if task != "sst2" else 0
    logits = vocab * (4 + 4 + 4 + itemsize)  # logits, log-softmax, their gradient (fp32)
    return int(tokens * (kept + logits))


def _abstract_batch(cfg: RunConfig, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (rows, cfg.data.max_length)
    batch = {
        "input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
    }
    if cfg.task == "sst2":
        batch["label"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
    else:
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
    return batch


def plan(
    cfg: RunConfig,
    *,
    devices: int | None = None,
    device_memory: int | None = None,
    compile: bool | None = None,
) -> Plan:
    """The memory plan of `cfg` on `devices` devices (default: this process's); see the module
    docstring. `device_memory` (bytes) defaults to what the local devices report (None on CPU).

    `compile`: whether to compile the step for XLA's exact peak (seconds to a minute; needs the
    mesh to fit this process's devices). The default compiles on GPUs and TPUs only: XLA:CPU
    computes bfloat16 in float32 and ignores remat when it assigns buffers (BENCHMARKS.md g), so
    its peak is that of a CPU run, not of the accelerator a plan made on a laptop is for.
    """
    local = jax.devices()
    if compile is None:
        compile = local[0].platform != "cpu"
    n = len(local) if devices is None else int(devices)
    if n < 1:
        raise ConfigError(f"devices={n} is invalid: expected a device count >= 1")
    try:
        sizes = cfg.mesh.resolve(n)
    except ValueError as e:
        raise ConfigError(f"{e} ({n} devices planned)") from e
    t = cfg.train
    prepass_grads = None
    micro = t.batch_size // t.grad_accum
    shards = sizes["data"] * sizes["fsdp"]
    if micro % shards:
        raise ConfigError(
            f"train.batch_size={t.batch_size}: micro-batches of {micro} do not split over "
            f"mesh.data × mesh.fsdp = {shards} devices"
        )
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    num_labels = len(tasks.SST2_LABELS) if cfg.task == "sst2" else None
    model, base = load_abstract(cfg.model.source, dtype=dtype, num_labels=num_labels)
    model = model.clone(remat=cfg.model.remat)
    layouts = None
    if cfg.model.scan_layers:
        where = scan.layers_of(model)
        model = model.clone(scan_layers=True)
        base = jax.eval_shape(lambda b: scan.stack_layers(b, *where), base)
        layouts = jlora.stacked_layouts(base)
    rules = jm.sharding_rules(model)
    base_specs = sharding.param_specs(base, rules, sizes)
    f32 = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)  # noqa: E731
    if t.full_finetune:
        trainable = {"params": f32(base)}
        trainable_specs = {"params": base_specs}
        frozen: dict[str, Any] = {"adapters": {}, "base": {}}
        frozen_specs: dict[str, Any] = {"adapters": {}, "base": {}}
        adapter_bytes = 0
    else:
        acfg = setup_lib.adapter_config(cfg, model)
        adapters = jlora.abstract_init(acfg, base, t.seed, layouts=layouts)
        kernels = {p: s for p, s in jlora.targets.flatten(base_specs).items() if p in adapters}
        ad_specs = sharding.adapter_specs(adapters, kernels, sizes)
        heads = [k for k in tasks.HEAD_MODULES if k in base] if _train_head(cfg) else []
        head = {k: f32(base[k]) for k in heads}
        head_specs = {k: base_specs[k] for k in heads}
        tr, fr = jlora.split(adapters)
        tr_specs, fr_specs = jlora.split(ad_specs)
        trainable = {"adapters": tr, "head": head}
        trainable_specs = {"adapters": tr_specs, "head": head_specs}
        rest = [k for k in base if k not in heads]
        frozen_base = quantized_abstract(cfg, {k: base[k] for k in rest})
        frozen = {"adapters": fr, "base": frozen_base}
        frozen_specs = {
            "adapters": fr_specs,
            "base": sharding.param_specs(frozen_base, rules, sizes),
        }
        adapter_bytes = _tree_bytes(fr, fr_specs, sizes)
        if setup_lib.needs_grads(cfg):
            flat_specs = jlora.targets.flatten(base_specs)
            flat_base = jlora.targets.flatten(base)
            prepass_grads = 2 * sum(
                _local_bytes(tuple(flat_base[p].shape), jnp.float32, flat_specs[p], sizes)
                for p in adapters
            )
    tx = setup_lib.optimizer(cfg, trainable)
    opt = jax.eval_shape(tx.init, trainable)
    opt_leaves = _state_specs(opt, trainable, trainable_specs)
    trainable_bytes = _tree_bytes(trainable, trainable_specs, sizes)
    per_device = {
        "base": _tree_bytes(frozen["base"], frozen_specs["base"], sizes),
        "adapters": adapter_bytes + (0 if t.full_finetune else trainable_bytes),
        "optimizer": sum(_local_bytes(tuple(x.shape), x.dtype, s, sizes) for x, s in opt_leaves),
        "gradients": trainable_bytes * (2 if t.grad_accum > 1 else 1),
        "activations": activation_bytes(
            model, micro // shards, cfg.data.max_length, cfg.model.remat, cfg.task
        ),
    }
    if t.full_finetune:
        per_device["base"] = trainable_bytes  # the fp32 parameters that train
    compiled = seconds = None
    if compile and n <= len(local):
        state = {
            "trainable": trainable,
            "opt": opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "guard": jax.eval_shape(steps.new_guard),
        }
        specs = {
            "trainable": trainable_specs,
            "opt": jax.tree.unflatten(jax.tree.structure(opt), [s for _, s in opt_leaves]),
            "step": P(),
            "guard": {k: P() for k in state["guard"]},
        }
        start = time.perf_counter()
        compiled = _compiled_peak(
            cfg, model, dtype, state, specs, frozen, frozen_specs, local[:n], micro
        )
        seconds = time.perf_counter() - start
    if device_memory is None:
        device_memory = device_memory_of(local[:n]) if n <= len(local) else None
    return Plan(
        name=cfg.name,
        source=cfg.model.source,
        method=cfg.method,
        devices=n,
        mesh=dict(sizes),
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
        rows_per_device=micro // shards,
        seq_len=cfg.data.max_length,
        parameters=count(base),
        trainable=count(trainable),
        per_device=per_device,
        prepass=None
        if prepass_grads is None
        else per_device["base"] + prepass_grads + per_device["activations"],
        estimate=sum(per_device.values()),
        compiled=compiled,
        compile_seconds=seconds,
        device_memory=device_memory,
    )


def quantized_abstract(cfg: RunConfig, base: Any) -> Any:
    """The abstract frozen base as `model.quantize` stores it: each kernel that
    `jlora.models.QUANTIZE_PATTERN` matches quantized (for "gguf", in the file's own type of
    each linear weight, read from its metadata)."""
    fmt = cfg.model.quantize
    if fmt == "none":
        return base
    if fmt != "gguf":
        return jax.eval_shape(lambda b: quant.quantize_params(b, fmt, jm.QUANTIZE_PATTERN), base)
    from jlora.models.gguf import GGUFCheckpoint
    from jlora.models.hub import _locate
    from jlora.models.llama.params import linen_path

    ckpt = GGUFCheckpoint(_locate(cfg.model.source))
    types = {}
    for name in ckpt.names():
        kind = ckpt.tensor_type(name)
        if kind in quant.ggml.FORMATS and name != "model.embed_tokens.weight":
            types[linen_path(name)[0]] = kind
    flat = traverse_util.flatten_dict(base, sep="/")
    out = {
        p: jax.eval_shape(functools.partial(quant.quantize_kernel, fmt=types[p]), x)
        if p in types
        else x
        for p, x in flat.items()
    }
    return traverse_util.unflatten_dict(out, sep="/")


def _train_head(cfg: RunConfig) -> bool:
    return cfg.task == "sst2" and cfg.train.train_head


def _compiled_peak(
    cfg: RunConfig,
    model: Any,
    dtype: Any,
    state: Any,
    state_specs: Any,
    frozen: Any,
    frozen_specs: Any,
    devices: list[Any],
    micro: int,
) -> int:
    """XLA's peak bytes per device of the run's step (the accumulating one under gradient
    accumulation), compiled from abstract, sharded arguments: nothing is allocated."""
    mesh = sharding.make_mesh(cfg.mesh, devices)

    def place(tree: Any, specs: Any) -> Any:
        named = sharding.named(mesh, specs)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, named
        )

    replicated = sharding.named(mesh, P())
    state = place(state, state_specs)
    frozen = place(frozen, frozen_specs)
    batch_specs = {k: P(sharding.BATCH) for k in _abstract_batch(cfg, micro)}
    batch = place(_abstract_batch(cfg, micro), batch_specs)
    loss_of = setup_lib.loss_of(cfg, model, dtype)
    tx = setup_lib.optimizer(cfg, state["trainable"])
    fused, accumulate, _ = steps.step_fns(
        loss_of, tx, cfg.train.nonfinite, jax.tree.map(lambda x: x.sharding, state), replicated
    )
    if cfg.train.grad_accum > 1:
        acc = (state["trainable"], jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))
        lowered = accumulate.lower(acc, state, frozen, batch, 0)
    else:
        lowered = fused.lower(state, frozen, batch)
    m = lowered.compile().memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def check_fits(cfg: RunConfig, devices: list[Any]) -> Plan | None:
    """`DoesNotFitError` with the plan's numbers when the estimated peak of `cfg` on `devices`
    exceeds their memory; the plan otherwise (None where the devices report no memory: CPU).
    `train.py` runs it before any weight is read (`--no-memory-check` skips it)."""
    memory = device_memory_of(devices)
    if memory is None:
        return None
    try:
        p = plan(cfg, devices=len(devices), device_memory=memory, compile=False)
    except Exception as e:  # the plan is advice: a model it cannot size still trains
        log.warning("memory plan not made (%s); not checked", exception_line(e))
        return None
    if not p.fits:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.per_device.items())
        raise DoesNotFitError(
            f"this run needs about {p.estimate / GiB:.2f} GiB per device ({parts} GiB) and each "
            f"of the {len(devices)} devices has {memory / GiB:.2f} GiB. Lower "
            "train.batch_size (or raise train.grad_accum), set model.remat=full, shard over "
            "more devices (mesh.fsdp), or pass --no-memory-check if the estimate is wrong "
            "(`train.py plan` compiles the step for the exact peak)"
        )
    return p
