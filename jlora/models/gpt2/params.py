"""Checkpoint key map between Hugging Face GPT-2 checkpoints and `GPT2` parameters.

Hugging Face names map one to one onto Linen paths: `transformer.h.3.attn.c_attn.weight` ->
`transformer/h_3/attn/c_attn/kernel`, `...ln_1.weight` -> `.../ln_1/scale`, `wte.weight` ->
`wte/embedding`. GPT-2's `Conv1D` weights are stored `(in, out)`, Flax's kernel layout, so none
is transposed; only an untied `lm_head.weight` (an `nn.Linear`) is.

Two naming schemes are read: `GPT2LMHeadModel.save_pretrained`'s (`transformer.` prefix, what
`params_to_hf` writes) and the original hub checkpoints' (openai-community/gpt2: `GPT2Model`
names without a prefix, `wte.weight`, `h.0.attn.c_attn.weight`, ...). The attention-mask buffers
old checkpoints carry (`h.N.attn.bias`, `h.N.attn.masked_bias`: not parameters) are ignored, as
is `lm_head.weight` when the head is tied.

`PEFT_CONFIG` holds the `adapter_config.json` fields `jlora.interop.peft.to_peft` adds for this
family: `fan_in_fan_out=True`, since PEFT wraps GPT-2's `Conv1D` projections (weights `(in,
out)`) with that flag. `lora_A` / `lora_B` keep the shapes they have for an `nn.Linear`
(`(r, in)`, `(out, r)`): PEFT reads in/out features from the Conv1D weight's shape, and DoRA's
`lora_magnitude_vector` is the per-output-feature norm, `(out,)`, as for Linear.

Example:
  >>> from jlora.models.gpt2 import params as gp
  >>> gp.linen_path("h.3.attn.c_attn.weight")
  ('transformer/h_3/attn/c_attn/kernel', False)
  >>> gp.hf_name("transformer/ln_f/scale")
  'transformer.ln_f.weight'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.models.gpt2.model import GPT2, PRESETS, SHARDING, GPT2Config
from jlora.quant import is_quantized

log = logging.getLogger(__name__)

model_class = GPT2
__all__ = [
    "PEFT_CONFIG",
    "PRESETS",
    "SHARDING",
    "config_from_hf",
    "config_to_hf",
    "hf_module",
    "model_class",
    "params_from_hf",
    "params_to_hf",
    "peft_task_type",
]

# Fields `jlora.interop.peft.to_peft` writes into adapter_config.json for GPT-2 models.
PEFT_CONFIG: dict[str, Any] = {"fan_in_fan_out": True}

ARCHITECTURE = "GPT2LMHeadModel"
_PREFIX = "transformer."
# Non-parameter buffers of older checkpoints: the causal mask `h.N.attn.bias` (not
# `h.N.attn.c_attn.bias`) and `h.N.attn.masked_bias`.
_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$")
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# transformers' defaults for the fields a config.json may leave out (GPT-2 small).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
}
# transformers' `attribute_map`: a config.json may use the generic names.
_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


def config_from_hf(hf: dict[str, Any]) -> GPT2Config:
    """`GPT2Config` from a transformers `config.json` dict (missing fields take transformers'
    defaults, GPT-2 small's).

    Example:
      >>> config_from_hf({"model_type": "gpt2", "n_layer": 2}).n_layer
      2
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json model_type={model_type!r}: the GPT-2 family reads 'gpt2'")
    if hf.get("add_cross_attention"):
        raise ValueError(
            f"config.json add_cross_attention={hf['add_cross_attention']!r}: jlora's GPT-2 is a "
            "decoder-only LM (expected false)"
        )
    fields = dict(_DEFAULTS)
    for alias, name in _ALIASES.items():
        if alias in hf and name not in hf:
            fields[name] = hf[alias]
    fields.update({k: hf[k] for k in _DEFAULTS if k in hf})
    eos = fields["eos_token_id"]
    fields["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
    return GPT2Config(**fields)


def config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
    """A complete `config.json` dict that `GPT2LMHeadModel.from_pretrained` loads."""
    eos = cfg.eos_token_id
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": cfg.activation_function,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": 0.02,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": 0.1,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
        "add_cross_attention": False,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
    }


def linen_path(name: str) -> tuple[str, bool]:
    """Linen path of a Hugging Face tensor name (with or without the `transformer.` prefix),
    and whether the tensor is transposed (only an untied `lm_head.weight`)."""
    if name == "lm_head.weight":
        return "lm_head/kernel", True
    parts = name.removeprefix(_PREFIX).split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        raise KeyError(name)
    module = re.sub(r"^h\.(\d+)", r"h_\1", ".".join(parts[:-1])).replace(".", "/")
    if parts[-1] == "bias":
        leaf = "bias"
    elif module in ("wte", "wpe"):
        leaf = "embedding"
    elif re.search(r"(^|/)ln_(1|2|f)$", module):
        leaf = "scale"
    else:
        leaf = "kernel"
    return f"transformer/{module}/{leaf}", False


def hf_name(path: str) -> str:
    """Hugging Face tensor name (`GPT2LMHeadModel`'s) of a Linen parameter path (inverse of
    `linen_path`)."""
    module, leaf = path.rsplit("/", 1)
    module = re.sub(r"(^|/)h_(\d+)(?=/|$)", r"\1h.\2", module).replace("/", ".")
    return f"{module}.{_LEAF[leaf]}"


def hf_module(cfg: GPT2Config, module: str) -> str:
    """Hugging Face module name of a Linen module path in `GPT2(cfg)` (`GPT2LMHeadModel`).

    Example:
      >>> hf_module(None, "transformer/h_0/attn/c_attn")
      'transformer.h.0.attn.c_attn'
    """
    del cfg  # every GPT-2 config names its modules alike
    return hf_name(f"{module}/kernel").removesuffix(".weight")


def peft_task_type(cfg: GPT2Config) -> str:
    """PEFT's `task_type` for `GPT2(cfg)`: a causal LM."""
    del cfg
    return "CAUSAL_LM"


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs (`GPT2LMHeadModel` names, checkpoint order) and its shape
    in the checkpoint."""
    d, inner = cfg.n_embd, cfg.inner_dim
    out = {
        "transformer.wte.weight": (cfg.vocab_size, d),
        "transformer.wpe.weight": (cfg.n_positions, d),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        out.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, inner),
                p + "mlp.c_fc.bias": (inner,),
                p + "mlp.c_proj.weight": (inner, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    out["transformer.ln_f.weight"] = (d,)
    out["transformer.ln_f.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out


def params_from_hf(
    cfg: GPT2Config,
    names: Iterable[str],
    read: Callable[[str], np.ndarray],
    dtype: Any = jnp.float32,
    *,
    place: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Linen params of `GPT2(cfg)` from Hugging Face tensors, read and cast one at a time.

    `names` may carry the `transformer.` prefix (`GPT2LMHeadModel`) or none (`GPT2Model`, the
    original hub checkpoints); `read(name)` returns one tensor as stored. Each is converted to
    `dtype` and dropped before the next is read. `place(path, x)`, when given, puts each
    converted tensor where it belongs (its sharding on a mesh: `jlora.sharding.placer`) before
    the next is read; a `jlora.models.lazy.Lazy` or quantized kernel goes to `place(path, x,
    dtype)` unread. Raises KeyError naming missing tensors, ValueError on a shape mismatch.
    """
    available = set(names)
    bare = "transformer.wte.weight" not in available and "wte.weight" in available
    needed = expected_shapes(cfg)

    def stored(name: str) -> str:  # the checkpoint's own name of a `GPT2LMHeadModel` name
        return name.removeprefix(_PREFIX) if bare and name.startswith(_PREFIX) else name

    missing = [stored(n) for n in needed if stored(n) not in available]
    if missing:
        raise KeyError(
            f"checkpoint lacks {len(missing)} tensor(s) the gpt2 config needs: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    used = {stored(n) for n in needed} | {"lm_head.weight"}
    extra = sorted(n for n in available - used if not _BUFFER.match(n))
    if extra:
        log.warning(
            "ignoring %d checkpoint tensor(s) the model does not use: %s", len(extra), extra[:5]
        )
    params: dict[str, Any] = {}
    for name, shape in needed.items():
        path, transpose = linen_path(name)
        x = read(stored(name))
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{stored(name)}: shape {tuple(x.shape)}, expected {shape} for the gpt2 config"
            )
        x = x.T if transpose else x
        if place is not None and (hasattr(x, "slicer") or is_quantized(x)):
            x = place(path, x, dtype)  # a `Lazy` read only where it lands, or quantized blocks
        else:
            x = jnp.asarray(x, dtype)
            if place is not None:
                x = place(path, x)
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return params


def params_to_hf(cfg: GPT2Config, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (float32, `GPT2LMHeadModel.save_pretrained`'s names and layout) of
    Linen params, in checkpoint order (a tied head writes no `lm_head.weight`, as transformers
    does not)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, path)
            else:
                flat[path] = value

    walk(dict(params), "")
    out: dict[str, np.ndarray] = {}
    for name in expected_shapes(cfg):
        path, transpose = linen_path(name)
        if path not in flat:
            raise KeyError(f"params lack {path!r} (needed for {name!r})")
        x = np.asarray(flat[path], np.float32)
        out[name] = np.ascontiguousarray(x.T if transpose else x)
    return out
