"""Hugging Face checkpoint key map for `jlora.models.bert`: configs, tensors and adapter presets.

A Linen path maps to the transformers name by joining with '.', writing `layer_N` as `layer.N`
and the leaf (`kernel`, `embedding`, `scale`) as `weight`; Linear kernels are transposed. In
`*ForSequenceClassification` checkpoints the encoder (and BERT's pooler) sit under `bert.` /
`roberta.` and the head (`classifier.*`) at top level; `BertModel` checkpoints (MiniLM) have no
prefix.

Example:
  >>> from jlora.models.bert import BertConfig, params_to_hf, Bert
  >>> import jax, jax.numpy as jnp
  >>> cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
  ...                  num_attention_heads=4, intermediate_size=24, num_labels=2)
  >>> p = Bert(cfg).init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
  >>> t = params_to_hf(cfg, p)
  >>> t["bert.encoder.layer.0.intermediate.dense.weight"].shape, t["classifier.weight"].shape
  ((24, 16), (2, 16))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.models.bert.model import SHARDING as SHARDING  # the family's layout rules
from jlora.models.bert.model import Bert, BertConfig

log = logging.getLogger(__name__)

model_class = Bert

_LAYER = r"encoder/layer(_\d+)?/"
_ATTN = r"attention/(self/(query|key|value)|output/dense)"
PRESETS = {
    "attention": rf"{_LAYER}{_ATTN}/kernel",
    "all-linear": rf"{_LAYER}({_ATTN}|intermediate/dense|output/dense)/kernel",
}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_HEAD = ("classifier", "pooler")  # may be initialised fresh when the checkpoint lacks them
# transformers' defaults for the fields a config.json may leave out.
_DEFAULTS = {
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def config_from_hf(hf: dict[str, Any], *, num_labels: int | None = None) -> BertConfig:
    """`BertConfig` from a transformers `config.json` dict (BertConfig / RobertaConfig fields).

    `num_labels` asks for a classification head; by default a `*ForSequenceClassification`
    checkpoint keeps its head (`len(id2label)` outputs) and any other gets none."""
    model_type = hf.get("model_type", "bert")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise KeyError(f"config.json lacks {missing} (model_type={model_type!r})")
    pet = hf.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise ValueError(
            f"config.json position_embedding_type={pet!r}: only 'absolute' is supported"
        )
    archs = hf.get("architectures") or []
    if num_labels is None and any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    pad = hf.get("pad_token_id")
    return BertConfig(
        **{k: hf[k] for k in _REQUIRED},
        **{k: hf.get(k, v) for k, v in _DEFAULTS.items()},
        pad_token_id=(1 if model_type == "roberta" else 0) if pad is None else pad,
        model_type=model_type,
        num_labels=num_labels,
    )


def config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """A complete transformers `config.json` dict for `cfg` (`BertModel`,
    `BertForSequenceClassification` or the RoBERTa equivalents)."""
    stem = {"bert": "Bert", "roberta": "Roberta"}[cfg.model_type]
    head = cfg.num_labels is not None
    hf: dict[str, Any] = {
        "model_type": cfg.model_type,
        "architectures": [stem + ("ForSequenceClassification" if head else "Model")],
        **{k: getattr(cfg, k) for k in (*_REQUIRED, *_DEFAULTS)},
        "pad_token_id": cfg.pad_token_id,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
    }
    if cfg.model_type == "roberta":
        hf.update(bos_token_id=0, eos_token_id=2)
    if head:
        labels = [f"LABEL_{i}" for i in range(cfg.num_labels)]
        hf["id2label"] = dict(enumerate(labels))
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
        hf["num_labels"] = cfg.num_labels
    return hf


def _shapes(cfg: BertConfig) -> dict[str, jax.ShapeDtypeStruct]:
    ids = jnp.zeros((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda: Bert(cfg).init(jax.random.key(0), ids))["params"]
    return traverse_util.flatten_dict(tree, sep="/")


def _hf_name(path: str, prefix: str) -> str:
    *mods, leaf = path.split("/")
    name = ".".join(re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in mods)
    return ("" if mods[0] == "classifier" else prefix) + f"{name}.{_LEAF[leaf]}"


def params_from_hf(
    cfg: BertConfig,
    names: Iterable[str],
    read: Callable[[str], np.ndarray],
    dtype: Any = jnp.float32,
    *,
    key: jax.Array | None = None,
    place: Callable[[str, Any], Any] | None = None,
) -> dict[str, Any]:
    """Linen params of `Bert(cfg)` from transformers tensors, read one at a time by `read(name)`
    (PyTorch layout) and cast at once to `dtype`. Names may carry any prefix (`bert.`,
    `roberta.`, none); unused tensors are ignored. A head missing from the checkpoint (a
    classifier on MiniLM) is initialised from `key`: normal(initializer_range) weights, zero
    biases. Raises KeyError naming any other missing tensor. `place(path, x)`, when given, puts
    each converted tensor where it belongs (`jlora.sharding.placer`) before the next is read."""
    names = set(names)
    anchor = "embeddings.word_embeddings.weight"
    prefix = next((n[: -len(anchor)] for n in sorted(names) if n.endswith(anchor)), "")
    shapes = _shapes(cfg)
    todo = {path: _hf_name(path, prefix) for path in shapes}
    missing = [n for p, n in todo.items() if n not in names and p.split("/")[0] not in _HEAD]
    if missing:
        raise KeyError(f"checkpoint lacks tensors needed by {cfg.model_type}: {missing}")
    flat, fresh = {}, []
    for path, name in todo.items():
        shape = shapes[path].shape
        if name not in names:
            fresh.append(path)
            continue
        x = read(name)
        if path.endswith("/kernel"):
            x = x.T
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} (as {path}), expected {shape}")
        if place is not None and hasattr(x, "slicer"):  # a `Lazy`: read only where it lands
            flat[path] = place(path, x, dtype)
            continue
        flat[path] = jnp.asarray(x, dtype)
        if place is not None:
            flat[path] = place(path, flat[path])
    if fresh:
        if key is None:
            key = jax.random.key(0)
            log.warning("params_from_hf: no key given, initialising fresh head params with key 0")
        for i, path in enumerate(fresh):
            w = cfg.initializer_range * jax.random.normal(
                jax.random.fold_in(key, i), shapes[path].shape
            )
            flat[path] = (w if path.endswith("/kernel") else jnp.zeros_like(w)).astype(dtype)
            if place is not None:
                flat[path] = place(path, flat[path])
        log.warning("params_from_hf: not in the checkpoint, initialised fresh: %s", fresh)
    return traverse_util.unflatten_dict(flat, sep="/")


def hf_module(cfg: BertConfig, module: str) -> str:
    """Hugging Face module name of a Linen module path in `Bert(cfg)`, as transformers' model
    (with a head: `BertForSequenceClassification`, encoder under `bert.` / `roberta.`) names it.

    Example:
      >>> cfg = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1,
      ...                  num_attention_heads=1, intermediate_size=4, num_labels=2)
      >>> hf_module(cfg, "encoder/layer_0/attention/self/query"), hf_module(cfg, "classifier")
      ('bert.encoder.layer.0.attention.self.query', 'classifier')
    """
    prefix = f"{cfg.model_type}." if cfg.num_labels is not None else ""
    return _hf_name(f"{module}/kernel", prefix).removesuffix(".weight")


def peft_task_type(cfg: BertConfig) -> str:
    """PEFT's `task_type` for `Bert(cfg)`: `SEQ_CLS` with a head, else `FEATURE_EXTRACTION`."""
    return "SEQ_CLS" if cfg.num_labels is not None else "FEATURE_EXTRACTION"


def params_to_hf(cfg: BertConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """float32 numpy tensors named and laid out as transformers' `BertModel` /
    `BertForSequenceClassification` (or RoBERTa's) `from_pretrained` expects. A model without a
    head has no pooler: load it with `BertModel.from_pretrained(path, add_pooling_layer=False)`."""
    prefix = f"{cfg.model_type}." if cfg.num_labels is not None else ""
    out = {}
    for path, v in traverse_util.flatten_dict(params, sep="/").items():
        x = np.asarray(v, np.float32)
        out[_hf_name(path, prefix)] = np.ascontiguousarray(x.T) if path.endswith("/kernel") else x
    return out
