"""The jlora adapter format: `save_adapters` / `load_adapters`, and the JSON form of configs and
specs that checkpoints' metadata also uses.

A folder holds `adapter_config.json` (the `AdapterConfig` with the method's options flat, and
each target's `AdapterSpec` with its options, seed and info, so adapters come back without
re-running `jlora.init`) and `adapters.safetensors` (tensors keyed `<target path>::<leaf>`, a
trained head under `extra::<path>`). Only what cannot be regenerated is stored: leaves the method
marks `regenerable` (NOLA's offset and bases, VeRA's shared pair) come back from the seed in the
spec, so a NOLA file holds k + l numbers per target. Version 2; version-1 folders (every method's
options in the config, method fields in each spec) still load.

A reload has equal specs and the same pytree structure, so `merge` gives the same kernels and a
restored optimizer state still fits. `load_adapters` checks every tensor against the saved spec
(shape from kernel_shape, rank and method; the saved floating dtype; none missing, none extra)
and raises `jlora.errors.CheckpointError` naming the file, the tensor and both shapes. The
writer never writes NaN or Inf: a non-finite adapter or `extra_params` leaf is a
`CheckpointError` raised before the folder is created or touched.

This module is model-agnostic (it imports no model family); exports for other tools are in
`jlora.interop` (`jlora.interop.peft.to_peft`).

Example:
  >>> import tempfile, jax.numpy as jnp, jlora
  >>> from jlora import persist
  >>> params = {"q": {"kernel": jnp.ones((8, 6))}}
  >>> cfg = jlora.AdapterConfig(method="nola", rank=2, nola_num_basis=(4, 3))
  >>> base, ad = jlora.init(cfg, params, 0)
  >>> folder = persist.save_adapters(tempfile.mkdtemp(), ad, cfg)
  >>> loaded, cfg2, extra, meta = persist.load_adapters(folder)
  >>> loaded["q/kernel"].spec == ad["q/kernel"].spec, cfg2 == cfg, extra, meta
  (True, True, None, {})
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora import targets
from jlora.adapters import Adapters, split_seed, with_seed
from jlora.config import AdapterConfig, Rule
from jlora.errors import CheckpointError
from jlora.layout import KernelLayout
from jlora.methods import METHODS, Adapter, AdapterSpec

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "JLORA_FILE",
    "READABLE_VERSIONS",
    "VERSION",
    "check_adapters_finite",
    "check_finite",
    "config_from_json",
    "leaf_shapes",
    "load_adapters",
    "save_adapters",
    "spec_from_json",
    "spec_to_json",
]

CONFIG_FILE = "adapter_config.json"
JLORA_FILE = "adapters.safetensors"
FORMAT = "jlora"
VERSION = 2
# Versions `load_adapters` reads: 1 wrote every method's options into the config and
# method-specific fields (nola_seed, ranks, ...) into each spec.
READABLE_VERSIONS = (1, 2)
_SEP = "::"
_EXTRA = "extra"


def _jsonable(x: Any) -> Any:
    """Tuples (nested) as lists; everything else as is."""
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x: Any) -> Any:
    """Lists (nested) back to tuples, as specs and configs hold them."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _config_to_json(config: AdapterConfig) -> dict[str, Any]:
    """The config in its flat form (the method's options as `<prefix>_<field>`)."""
    out = {k: _jsonable(v) for k, v in config.to_flat().items()}
    out["targets"] = [dataclasses.asdict(r) for r in config.targets]
    return out


def _fields_of(cls: type, data: Mapping[str, Any], what: str, extra: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(
            f"{what} has unknown fields {unknown}: expected fields of {cls.__name__}"
        )


_GENERIC = ("method", "rank", "alpha", "targets", "dropout", "rslora", "seed")


def config_from_json(data: Mapping[str, Any], version: int = VERSION) -> AdapterConfig:
    """An `AdapterConfig` from its JSON form (`save_adapters`, checkpoint metadata).

    Version 1 listed every method's options; those of other methods are dropped.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("method"), str):
        raise CheckpointError(f"{CONFIG_FILE} 'config' is not an AdapterConfig: {data!r:.200}")
    method = data["method"]
    if method not in METHODS:
        raise CheckpointError(
            f"{CONFIG_FILE} 'config' has method {method!r}, which is not registered here "
            f"(registered: {', '.join(METHODS)}); import the module that registers it first"
        )
    own = set(METHODS[method].options_class.flat_names())
    if version == 1:
        data = {k: v for k, v in data.items() if k in _GENERIC or k in own}
    unknown = sorted(set(data) - set(_GENERIC) - own)
    if unknown:
        raise CheckpointError(
            f"{CONFIG_FILE} 'config' has unknown fields {unknown}: expected AdapterConfig "
            f"fields and the options of method {method!r} ({', '.join(sorted(own)) or 'none'})"
        )
    kw = {k: _tuples(v) for k, v in data.items()}
    kw["targets"] = tuple(Rule(**r) for r in data["targets"])
    return AdapterConfig(**kw)


def spec_to_json(spec: AdapterSpec) -> dict[str, Any]:
    """One target's `AdapterSpec` as JSON (its options flat, `info` as a mapping)."""
    out = {
        f.name: _jsonable(getattr(spec, f.name))
        for f in dataclasses.fields(spec)
        if f.name not in ("options", "info", "layout")
    }
    out["options"] = {k: _jsonable(v) for k, v in spec.options.to_flat().items()}
    out["info"] = {k: _jsonable(v) for k, v in spec.info}
    if spec.layout is not None:  # absent: the default layout (and specs written before layouts)
        out["layout"] = spec.layout.to_json()
    return out


# Version-1 spec fields: derived now (trainable, lr_ratios, residual) or renamed.
_V1_FIELDS = (
    "trainable",
    "lr_ratios",
    "residual",
    "nola_seed",
    "nola_num_basis",
    "ranks",
    "budget",
)


def spec_from_json(
    data: Mapping[str, Any], path: str, config: AdapterConfig | None = None
) -> AdapterSpec:
    """Inverse of `spec_to_json`; also reads version-1 specs, whose options come from `config`
    (the config saved with them)."""
    what = f"{CONFIG_FILE} spec of {path!r}"
    method = data.get("method")
    if method not in METHODS:
        raise CheckpointError(
            f"{what}: method {method!r} is not registered here (registered: "
            f"{', '.join(METHODS)}); import the module that registers it first"
        )
    cls = METHODS[method].options_class
    kw = {k: _tuples(v) for k, v in data.items()}
    if "options" in kw:  # version 2
        _fields_of(AdapterSpec, data, what)
        names = cls.flat_names()
        bad = sorted(set(kw["options"]) - set(names))
        if bad:
            raise CheckpointError(f"{what}: options {bad} are not options of method {method!r}")
        kw["options"] = cls.from_flat(kw["options"])
        kw["info"] = tuple(sorted(kw.get("info", {}).items()))
        kw["info"] = tuple((k, _tuples(v)) for k, v in kw["info"])
        if kw.get("layout") is not None:
            try:
                kw["layout"] = KernelLayout(**kw["layout"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{what}: layout {data['layout']!r}: {e}") from None
        return AdapterSpec(**kw)
    _fields_of(AdapterSpec, data, what, extra=_V1_FIELDS)
    options = config.options if config is not None and config.method == method else cls()
    if kw.get("nola_num_basis") is not None:
        options = dataclasses.replace(options, num_basis=kw["nola_num_basis"])
    info = {k: kw[k] for k in ("budget", "ranks") if kw.get(k) is not None}
    kw = {k: v for k, v in kw.items() if k not in _V1_FIELDS}
    return AdapterSpec(
        **kw, options=options, seed=data.get("nola_seed"), info=tuple(sorted(info.items()))
    )


def leaf_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every leaf an adapter of `spec` holds, from its method's `leaves(spec)`:
    `A: (d_in, r)`, `M: (r, r)`, `B: (r, d_out)`, NOLA's `alpha: (k,)` and `beta: (l,)` (and
    its bases when cached), ..., each with the stacked axes in front.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> cfg = jlora.AdapterConfig(method="slora", rank=2)
      >>> _, ad = jlora.init(cfg, {"kernel": jnp.ones((5, 3))})
      >>> leaf_shapes(ad["kernel"].spec)
      {'A': (5, 2), 'M': (2, 2), 'B': (2, 3)}
    """
    return {n: leaf.shape(spec) for n, leaf in METHODS[spec.method].leaves(spec).items()}


def _regenerable(spec: AdapterSpec) -> tuple[str, ...]:
    """Leaves a reload recomputes from the spec instead of reading them."""
    return tuple(n for n, leaf in METHODS[spec.method].leaves(spec).items() if leaf.regenerable)


@functools.partial(jax.jit, static_argnames="spec")
def _regen_jit(seed: jax.Array | None, *, spec: AdapterSpec) -> dict[str, jax.Array]:
    # The seed is traced as in `jlora.init`, so the leaves are the very same numbers.
    return METHODS[spec.method].regenerate(with_seed(spec, seed))


def _regenerate(spec: AdapterSpec) -> dict[str, jax.Array]:
    static, seed = split_seed(spec)
    return _regen_jit(seed, spec=static)


def _check_key(field: str, key: str) -> None:
    if _SEP in key:
        raise ValueError(f"{field} path {key!r} contains {_SEP!r}, which the file format reserves")


def check_finite(
    tensors: Mapping[str, Any], describe: Callable[[str], str], out: pathlib.Path
) -> None:
    """Raises CheckpointError naming (`describe(key)`) the first tensor holding NaN or Inf, so
    that nothing non-finite is written to `out`."""
    for key, leaf in tensors.items():
        x = np.asarray(leaf)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        finite = np.isfinite(x)
        if not finite.all():
            nan = int(np.isnan(x).sum())
            raise CheckpointError(
                f"{describe(key)} has non-finite values ({nan} NaN, "
                f"{x.size - int(finite.sum()) - nan} Inf of {x.size}): refusing to write {out} "
                "(the training diverged? lower the learning rate or export an earlier checkpoint)"
            )


def check_adapters_finite(adapters: Adapters, extra_params: Any, out: pathlib.Path) -> None:
    """Every adapter leaf and every leaf of `extra_params` is finite (see `check_finite`)."""
    for p, a in adapters.items():
        check_finite(a.params, lambda name, p=p: f"adapters[{p!r}] leaf {name!r}", out)
    if extra_params is not None:
        check_finite(targets.flatten(extra_params), lambda p: f"extra_params {p!r}", out)


def save_adapters(
    path: str | os.PathLike,
    adapters: Adapters,
    config: AdapterConfig,
    *,
    extra_params: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes adapters in the jlora format (see the module docstring); returns the folder.

    Args:
      path: the folder to write (created if needed).
      adapters: `{target path: Adapter}` as `jlora.init` returns them (trained or not).
      config: the `AdapterConfig` they were made with.
      extra_params: other trained parameters to keep, e.g. a classification head
        `{"classifier": {...}, "pooler": {...}}` (a pytree of arrays).
      metadata: JSON-serialisable information (step, task, metrics, ...).

    Raises:
      CheckpointError: a leaf of `adapters` or `extra_params` holds NaN or Inf (checked before
        anything is written).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a jlora.AdapterConfig, got {type(config).__name__}")
    try:
        meta = json.loads(json.dumps(dict(metadata or {})))
    except TypeError as e:
        raise TypeError(f"metadata={metadata!r} must be JSON-serialisable: {e}") from e
    tensors: dict[str, np.ndarray] = {}
    specs: dict[str, Any] = {}
    for p, a in adapters.items():
        _check_key("adapters", p)
        skip = _regenerable(a.spec)
        for name, leaf in a.params.items():
            if name not in skip:
                tensors[f"{p}{_SEP}{name}"] = np.asarray(leaf)
        specs[p] = {
            "spec": spec_to_json(a.spec),
            "leaves": {name: jnp.dtype(leaf.dtype).name for name, leaf in a.params.items()},
        }
    extra = targets.flatten(extra_params) if extra_params is not None else {}
    for p, leaf in extra.items():
        _check_key("extra_params", p)
        tensors[f"{_EXTRA}{_SEP}{p}"] = np.asarray(leaf)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "config": _config_to_json(config),
        "targets": specs,
        "extra_params": list(extra) if extra_params is not None else None,
        "metadata": meta,
    }
    out = pathlib.Path(path)
    check_adapters_finite(adapters, extra_params, out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(out / JLORA_FILE), metadata={"format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return out


def _spec_summary(spec: AdapterSpec) -> str:
    return f"method={spec.method!r}, kernel_shape={spec.kernel_shape}, rank={spec.rank}"


def _check_leaf_names(file: pathlib.Path, path: str, spec: AdapterSpec, names: Any) -> None:
    """The saved leaf names are exactly the method's `leaves(spec)`."""
    known = leaf_shapes(spec)
    unknown = sorted(set(names) - set(known))
    missing = sorted(set(known) - set(names))
    if unknown or missing:
        raise CheckpointError(
            f"{file}: target {path!r} lists leaves {sorted(names)}; {_spec_summary(spec)} "
            f"has leaves {sorted(known)} (unknown: {unknown}, missing: {missing})"
        )


def _check_tensor(
    file: pathlib.Path, key: str, x: np.ndarray, shape: tuple[int, ...], dtype: str, what: str
) -> None:
    """A tensor read from `file` has the expected shape and the saved floating dtype."""
    if tuple(x.shape) != tuple(shape):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(x.shape)}, expected {tuple(shape)} ({what})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).name != dtype:
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {jnp.dtype(x.dtype).name}, expected {dtype} "
            f"(a floating dtype; {what})"
        )


def _read_doc(folder: pathlib.Path) -> dict[str, Any]:
    """`adapter_config.json` of a jlora folder, its format and version checked."""
    file = folder / CONFIG_FILE
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: no such file (not a folder save_adapters wrote)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    info = doc if isinstance(doc, dict) else {}
    if info.get("format") != FORMAT or info.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{file}: format={info.get('format')!r} version={info.get('version')!r}"
            f", expected format={FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))} "
            "(a PEFT folder? use peft to load it)"
        )
    return doc


def _read_tensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: no such file") from e
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def _load_target(
    file: pathlib.Path,
    path: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    config: AdapterConfig,
) -> Adapter:
    """One target's adapter, every stored tensor checked against its saved spec."""
    spec = spec_from_json(entry["spec"], path, config)
    _check_leaf_names(file, path, spec, entry["leaves"])
    shapes = leaf_shapes(spec)
    leaves: dict[str, jax.Array] = {}
    regenerated: dict[str, jax.Array] | None = None
    for name, dtype in entry["leaves"].items():
        key = f"{path}{_SEP}{name}"
        if key in tensors:
            what = f"leaf {name!r} of target {path!r} with {_spec_summary(spec)}"
            _check_tensor(file, key, tensors[key], shapes[name], dtype, what)
            leaves[name] = jnp.asarray(tensors[key])
        elif name in _regenerable(spec):
            regenerated = regenerated if regenerated is not None else _regenerate(spec)
            leaves[name] = regenerated[name].astype(dtype)
        else:
            raise CheckpointError(f"{file}: lacks tensor {key!r} of target {path!r}")
    return Adapter(params=leaves, spec=spec)


def load_adapters(
    path: str | os.PathLike,
) -> tuple[Adapters, AdapterConfig, Any, dict[str, Any]]:
    """Reads a folder written by `save_adapters`.

    Returns:
      `(adapters, config, extra_params, metadata)`: adapters with the saved specs and leaves
      (NOLA bases regenerated where they were cached), the `AdapterConfig`, the extra parameter
      pytree (None if none was saved) and the metadata dict (empty if none).

    Raises:
      CheckpointError: a file is missing or unreadable, not of this format, or a tensor does not
        fit the saved spec: a shape other than the one its spec's kernel_shape, rank and method
        give (`leaf_shapes`), a dtype other than the saved floating one, a tensor missing, or a
        tensor no target or extra parameter owns.
    """
    folder = pathlib.Path(path)
    doc = _read_doc(folder)
    file = folder / JLORA_FILE
    tensors = _read_tensors(file)
    config = config_from_json(doc["config"], doc["version"])
    adapters = {p: _load_target(file, p, e, tensors, config) for p, e in doc["targets"].items()}
    owned = {f"{p}{_SEP}{name}" for p, e in doc["targets"].items() for name in e["leaves"]}
    extra = None
    if doc.get("extra_params") is not None:
        flat = {}
        for p in doc["extra_params"]:
            key = f"{_EXTRA}{_SEP}{p}"
            if key not in tensors:
                raise CheckpointError(f"{file}: lacks tensor {key!r} of extra_params {p!r}")
            flat[p] = jnp.asarray(tensors[key])
            owned.add(key)
        extra = traverse_util.unflatten_dict(flat, sep="/")
    stray = sorted(set(tensors) - owned)
    if stray:
        raise CheckpointError(
            f"{file}: unexpected tensors {stray[:3]}{' ...' if len(stray) > 3 else ''} "
            f"({len(stray)} in all) that no target leaf or extra parameter of {CONFIG_FILE} owns"
        )
    return adapters, config, extra, dict(doc.get("metadata") or {})
