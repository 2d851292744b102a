"""A model and its parameter shapes from the config alone: no weight is read or allocated.

`load_abstract(source)` returns `(model, params)` where `params` holds `jax.ShapeDtypeStruct`s of
exactly the tree `jlora.models.load(source)` returns, so a run can be sized (`train.py plan`)
for an 8B model on a laptop. It resolves `source` like `load`, reading only:

- a Hugging Face folder's `config.json` (the safetensors are not opened);
- a `.gguf` file's header (memory-mapped; tensor data is not read), a llama2.c `.bin`
  (a format for tiny models, read whole);
- an offline package's files, as above;
- for a hub id: a config shipped with jlora for the models the papers fine-tune (`KNOWN`, so
  planning works offline), else the hub's `config.json` alone.

Example:
  >>> import jlora.models.abstract as ab
  >>> model, params = ab.load_abstract("meta-llama/Llama-3.1-8B")
  >>> ab.count(params)
  8030261248
  >>> params["model"]["embed_tokens"]["embedding"].dtype
  dtype(bfloat16)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import ModelFileError, exception_line
from jlora.models import hub

__all__ = ["KNOWN", "count", "known_config", "load_abstract"]

_KNOWN_DIR = pathlib.Path(__file__).parent / "known"
# Hub ids whose config.json ships with jlora (copies of the hub's files), by hub id; the
# papers' runs (configs/paper/) use them. Older names of the same repositories map to the same
# file.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": "meta-llama--Llama-2-7b-hf.json",
    "meta-llama/Llama-3.1-8B": "meta-llama--Llama-3.1-8B.json",
    "meta-llama/Meta-Llama-3.1-8B": "meta-llama--Llama-3.1-8B.json",
    "meta-llama/Llama-3.2-1B": "meta-llama--Llama-3.2-1B.json",
}


def known_config(repo_id: str) -> dict[str, Any] | None:
    """The shipped `config.json` of hub id `repo_id`, or None when jlora ships none."""
    name = KNOWN.get(repo_id)
    return None if name is None else json.loads((_KNOWN_DIR / name).read_text())


def count(params: Any) -> int:
    """The number of parameters in a tree of arrays or `jax.ShapeDtypeStruct`s."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def _hub_config(repo_id: str) -> dict[str, Any]:
    """The hub's `config.json` of `repo_id` (the one file), or `ModelNotFoundError`."""
    try:
        from huggingface_hub import hf_hub_download

        return hub._read_json(pathlib.Path(hf_hub_download(repo_id, "config.json")))
    except ModelFileError:
        raise
    except Exception as e:  # offline, unknown id, gated repo ...
        raise hub.ModelNotFoundError(
            f"{repo_id!r}: no local path, and its config.json is not reachable on the Hugging "
            f"Face hub ({exception_line(e)}); jlora ships the configs of {sorted(KNOWN)}"
        ) from e


def _abstract_params(model: Any, dtype: Any) -> Any:
    """Shapes of `model.init`, every leaf in `dtype` (what `load` casts each tensor to)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids)["params"])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def load_abstract(
    source: str | os.PathLike, *, dtype: Any = jnp.bfloat16, num_labels: int | None = None
) -> tuple[Any, Any]:
    """`(model, params)` with `jax.ShapeDtypeStruct` leaves (see the module docstring); the
    arguments are `jlora.models.load`'s."""
    text = os.fspath(source)
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r}: expected jnp.float32 or jnp.bfloat16")
    local = pathlib.Path(text).expanduser()
    is_hub_id = not local.exists() and text not in hub.PACKAGES and not hub._looks_local(text)
    fallback = hub.HUB_FALLBACKS.get(text)
    if is_hub_id and (fallback is None or hub._package_path(fallback) is None):
        hf_config = known_config(text)
        if hf_config is None:
            hf_config = _hub_config(text)
        fam, cfg = hub._build_from(pathlib.Path(text), hf_config, num_labels)
        model = fam.model_class(cfg, dtype)
        return model, _abstract_params(model, dtype)
    # An offline package carries a hub id's model: its config is the hub's.
    path = hub._package_path(fallback) if is_hub_id and fallback else hub._locate(text)
    if path.is_dir():
        where = path / "config.json"
        if not where.exists():
            raise hub.ModelNotFoundError(f"{path}: no config.json")
        fam, cfg = hub._build_from(where, hub._read_json(where), num_labels)
        model = fam.model_class(cfg, dtype)
    elif path.suffix == ".gguf":
        from jlora.models import gguf

        fam, cfg = hub._build_from(path, gguf.GGUFCheckpoint(path).config, None)
        model = fam.model_class(cfg, dtype)
    elif path.suffix == ".bin":
        from jlora.models import llama2c
        from jlora.models.llama import Llama

        cfg, _ = llama2c.load_checkpoint(path)
        model = Llama(cfg, dtype)
    else:
        raise ModelFileError(f"{path}: not a model file jlora reads; {hub._ALTERNATIVES}")
    return model, _abstract_params(model, dtype)
