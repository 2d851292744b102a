"""Checkpoint key map between Hugging Face Llama-family checkpoints and `Llama` parameters.

Hugging Face names (`model.layers.3.self_attn.q_proj.weight`, PyTorch `(out, in)` layout) map
one to one onto Linen paths (`model/layers_3/self_attn/q_proj/kernel`, `(in, out)`). The same
names serve Llama, Mistral, Qwen2/2.5, Qwen3 and SmolLM2; the config decides which exist.

Example:
  >>> from jlora.models.llama import params as lp
  >>> lp.linen_path("model.layers.3.self_attn.q_proj.weight")
  ('model/layers_3/self_attn/q_proj/kernel', True)
  >>> lp.hf_name("model/embed_tokens/embedding")
  'model.embed_tokens.weight'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.models.llama.model import PRESETS, SHARDING, Llama, LlamaConfig, RopeScaling
from jlora.quant import is_quantized

log = logging.getLogger(__name__)

model_class = Llama
__all__ = [
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

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_LINEAR = re.compile(r".*_proj$|^lm_head$")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers v5 keeps theta and scaling in `rope_parameters`; v4 files use `rope_theta`
    # and `rope_scaling` (with "type" in very old ones).
    rp = dict(hf.get("rope_parameters") or {})
    rp.update(hf.get("rope_scaling") or {})
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(
            f"config.json rope_type={kind!r}: jlora supports 'default', 'linear' and 'llama3'"
        )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(rope_type=kind, **{k: rp[k] for k in fields if k in rp})


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """`LlamaConfig` from a transformers `config.json` dict (llama, mistral, qwen2, qwen3)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"config.json model_type={model_type!r}: the decoder family supports "
            f"{sorted(ARCHITECTURES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: Llama-family models use 'silu'")
    theta, scaling = _rope(hf)
    sliding = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        sliding = None
    bias = bool(hf.get("attention_bias") or False)
    head_dim = hf.get("head_dim")
    eos = hf.get("eos_token_id")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        # Normalised so that a default head_dim written out explicitly compares equal.
        head_dim=None if head_dim == hf["hidden_size"] // hf["num_attention_heads"] else head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bias,
        o_bias=model_type in ("llama", "mistral") and bias,
        mlp_bias=bool(hf.get("mlp_bias") or False),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers loads into the matching `*ForCausalLM`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**vars(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    expected_bias = {
        "llama": (cfg.attention_bias, cfg.attention_bias),
        "mistral": (cfg.attention_bias, cfg.attention_bias),
        "qwen2": (True, False),
        "qwen3": (False, False),
    }[cfg.model_type]
    if (cfg.attention_bias, cfg.o_bias) != expected_bias:
        raise ValueError(
            f"LlamaConfig(attention_bias={cfg.attention_bias}, o_bias={cfg.o_bias}) has no "
            f"transformers equivalent for model_type={cfg.model_type!r}"
        )
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    if cfg.model_type in ("llama", "mistral"):
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["sliding_window"] = cfg.sliding_window
        out["max_window_layers"] = cfg.num_hidden_layers
    return out


def linen_path(name: str) -> tuple[str, bool]:
    """Linen path of a Hugging Face tensor name, and whether the tensor is transposed."""
    parts = name.split(".")
    if parts[-1] not in ("weight", "bias"):
        raise KeyError(name)
    module = ".".join(parts[:-1])
    module = re.sub(r"layers\.(\d+)", r"layers_\1", module).replace(".", "/")
    if parts[-1] == "bias":
        return f"{module}/bias", False
    if module.endswith("embed_tokens"):
        return f"{module}/embedding", False
    if _LINEAR.match(parts[-2]):
        return f"{module}/kernel", True
    return f"{module}/weight", False


def hf_name(path: str) -> str:
    """Hugging Face tensor name of a Linen parameter path (inverse of `linen_path`)."""
    module, leaf = path.rsplit("/", 1)
    module = re.sub(r"layers_(\d+)", r"layers.\1", module).replace("/", ".")
    return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def hf_module(cfg: LlamaConfig, module: str) -> str:
    """Hugging Face module name of a Linen module path in `Llama(cfg)` (`*ForCausalLM`).

    Example:
      >>> hf_module(None, "model/layers_0/self_attn/q_proj")
      'model.layers.0.self_attn.q_proj'
    """
    del cfg  # every Llama-family config names its modules alike
    return hf_name(f"{module}/kernel").removesuffix(".weight")


def peft_task_type(cfg: LlamaConfig) -> str:
    """PEFT's `task_type` for `Llama(cfg)`: a causal LM."""
    del cfg
    return "CAUSAL_LM"


def expected_names(cfg: LlamaConfig) -> list[str]:
    """Every tensor name the model needs, in checkpoint order."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in "qkvo":
            names.append(f"{p}self_attn.{proj}_proj.weight")
            if (proj != "o" and cfg.attention_bias) or (proj == "o" and cfg.o_bias):
                names.append(f"{p}self_attn.{proj}_proj.bias")
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate", "up", "down"):
            names.append(f"{p}mlp.{proj}_proj.weight")
            if cfg.mlp_bias:
                names.append(f"{p}mlp.{proj}_proj.bias")
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def params_from_hf(
    cfg: LlamaConfig,
    names: Iterable[str],
    read: Callable[[str], np.ndarray],
    dtype: Any = jnp.float32,
    *,
    place: Callable[[str, Any], Any] | None = None,
) -> dict[str, Any]:
    """Linen params from Hugging Face tensors, read and cast one at a time.

    `read(name)` returns one tensor in PyTorch layout; each is converted to `dtype` and dropped
    before the next is read, so the host never holds a second full copy of the model.
    `place(path, x)`, when given, puts each converted tensor where it belongs (its sharding on a
    mesh: `jlora.sharding.placer`) before the next is read.
    """
    available = set(names)
    needed = expected_names(cfg)
    missing = [n for n in needed if n not in available]
    if missing:
        raise KeyError(
            f"checkpoint lacks {len(missing)} tensor(s) the {cfg.model_type} config needs: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    extra = sorted(available - set(needed) - {"lm_head.weight"})
    if extra:
        log.warning(
            "ignoring %d checkpoint tensor(s) the model does not use: %s", len(extra), extra[:5]
        )
    params: dict[str, Any] = {}
    for name in needed:
        path, transpose = linen_path(name)
        x = read(name)
        x = x.T if transpose else x
        if place is not None and (hasattr(x, "slicer") or is_quantized(x)):
            x = place(path, x, dtype)  # a `Lazy` read only where it lands, or a GGUF's blocks
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


def params_to_hf(cfg: LlamaConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (float32, PyTorch layout) of Linen params, in checkpoint order."""
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, path)
            else:
                flat[path] = value

    walk(dict(params), "")
    out: dict[str, np.ndarray] = {}
    for name in expected_names(cfg):
        path, transpose = linen_path(name)
        if path not in flat:
            raise KeyError(f"params lack {path!r} (needed for {name!r})")
        x = np.asarray(flat[path], np.float32)
        out[name] = np.ascontiguousarray(x.T if transpose else x)
    return out
