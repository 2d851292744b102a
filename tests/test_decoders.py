"""Llama-family decoders against transformers (PyTorch) on tiny random configs: logits,
KV-cache generation, loading Hugging Face folders (single and sharded, fp32 and bf16) and
`save_hf` round trips. Torch tests skip cleanly without the `parity` extra."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models as jm
from jlora.models.llama import Llama, LlamaConfig
from jlora.models.llama import params as lp

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Every family and feature: GQA (all), llama3 rope scaling, biases, tied embeddings, sliding
# window, qkv bias, q/k norm with an explicit head_dim.
CASES = {
    "llama3_rope": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500.0)),
    "llama_bias_tied": (
        "LlamaConfig",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "mistral_window": ("MistralConfig", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
}


def _torch_model(case: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, extra = CASES[case]
    hf_config = getattr(transformers, cls)(**BASE, **extra, max_position_embeddings=64)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # pretrained-like magnitudes; biases and norms too
            p.normal_(0, 0.3)
    return model


def _to_jax(tm):
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = lp.config_from_hf(tm.config.to_dict())
    return Llama(cfg), lp.params_from_hf(cfg, sd, sd.__getitem__)


def _batch():
    ids = np.random.RandomState(0).randint(3, 64, (3, 9))
    right = np.ones_like(ids)
    right[1, 6:] = 0
    left = np.ones_like(ids)
    left[1, :4] = 0
    left[2, :1] = 0
    return ids, right, left


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    torch = pytest.importorskip("torch")
    tm = _torch_model(case)
    model, params = _to_jax(tm)
    ids, right, _ = _batch()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(right)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(right)))
    assert out.shape == ref.shape
    assert np.abs(out - ref)[right.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_matches_transformers_with_left_padding(case):
    torch = pytest.importorskip("torch")
    tm = _torch_model(case)
    model, params = _to_jax(tm)
    ids, _, left = _batch()
    with torch.no_grad():
        ref = tm.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(left),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()
    out = np.asarray(jm.generate(model, params, ids, left, max_new_tokens=10, stop_tokens=()))
    np.testing.assert_array_equal(out, ref)


def test_left_padded_row_generates_as_alone():
    tm_free = LlamaConfig(**BASE, rope_theta=100.0)
    model = Llama(tm_free)
    ids, _, left = _batch()
    params = model.init(jax.random.key(0), jnp.asarray(ids))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)
    batch = np.asarray(jm.generate(model, params, ids, left, max_new_tokens=6))
    alone = np.asarray(jm.generate(model, params, ids[1:2, 4:], max_new_tokens=6))
    np.testing.assert_array_equal(batch[1, 4:], alone[0])


def test_stop_tokens_and_padding_after_stop():
    model = Llama(LlamaConfig(**BASE))
    ids, _, _ = _batch()
    params = model.init(jax.random.key(1), jnp.asarray(ids))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)
    free = np.asarray(jm.generate(model, params, ids, max_new_tokens=8, stop_tokens=()))
    stop = int(free[0, 9 + 2])  # the third new token of row 0
    out = np.asarray(
        jm.generate(model, params, ids, max_new_tokens=8, stop_tokens=[stop], pad_token_id=63)
    )
    for row, ref in zip(out, free, strict=True):
        new, ref_new = row[9:], ref[9:]
        hits = np.flatnonzero(ref_new == stop)
        end = hits[0] + 1 if hits.size else len(ref_new)
        np.testing.assert_array_equal(new[:end], ref_new[:end])
        assert (new[end:] == 63).all()


def test_sampling_top_p_and_temperature():
    model = Llama(LlamaConfig(**BASE))
    ids, _, _ = _batch()
    params = model.init(jax.random.key(2), jnp.asarray(ids))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)
    greedy = jm.generate(model, params, ids, max_new_tokens=6, stop_tokens=())
    # A nucleus so small that only the most likely token survives is greedy decoding.
    narrow = jm.generate(model, params, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(greedy, narrow)
    a = jm.generate(model, params, ids, max_new_tokens=6, temperature=2.0, key=jax.random.key(3))
    b = jm.generate(model, params, ids, max_new_tokens=6, temperature=2.0, key=jax.random.key(4))
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="top_p=0"):
        jm.generate(model, params, ids, max_new_tokens=2, temperature=1.0, top_p=0)


def test_generate_with_adapters_equals_merged():
    model = Llama(LlamaConfig(**BASE))
    ids, _, left = _batch()
    params = model.init(jax.random.key(0), jnp.asarray(ids))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)
    cfg = jlora.AdapterConfig(method="lora", rank=4, targets=jm.preset(model, "all-linear"))
    params, adapters = jlora.init(cfg, params)
    # Non-zero B so the adapters change the output.
    adapters = jax.tree.map(lambda x: x + 0.3, adapters)
    factored = jm.generate(model, params, ids, left, max_new_tokens=6, adapters=adapters)
    merged = jm.generate(model, jlora.merge(params, adapters), ids, left, max_new_tokens=6)
    plain = jm.generate(model, params, ids, left, max_new_tokens=6)
    np.testing.assert_array_equal(factored, merged)
    assert not np.array_equal(factored, plain)


@pytest.mark.parametrize("shard", [False, True])
def test_load_hf_folder(tmp_path, shard):
    torch = pytest.importorskip("torch")
    tm = _torch_model("qwen3")
    tm.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    model, params, tokenizer = jm.load(tmp_path)
    assert tokenizer is None and model.config.qk_norm
    ids, right, _ = _batch()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(right)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, ids, right))
    assert np.abs(out - ref)[right.astype(bool)].max() <= 1e-4


def test_load_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    tm = _torch_model("llama3_rope")
    tm.to(torch.bfloat16).save_pretrained(tmp_path)
    model, params, _ = jm.load(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    model32, params32, _ = jm.load(tmp_path)
    ids, _, _ = _batch()
    lo = np.asarray(model.apply({"params": params}, ids))
    hi = np.asarray(model32.apply({"params": params32}, ids))
    assert np.corrcoef(lo.ravel(), hi.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("case", list(CASES))
def test_save_hf_round_trip(tmp_path, case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, params = _to_jax(_torch_model(case))
    jm.save_hf(tmp_path, model, params)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info
    ids, right, _ = _batch()
    with torch.no_grad():
        ref = loaded.eval()(torch.tensor(ids), attention_mask=torch.tensor(right)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, ids, right))
    assert np.abs(out - ref)[right.astype(bool)].max() <= 1e-4
    # ... and jlora reads its own export back to the same config.
    again, _, _ = jm.load(tmp_path)
    assert again.config == model.config


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LlamaConfig(**{**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        lp.config_from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type='t5'"):
        jm.hub.family_of("t5")


def test_missing_tensor_is_named():
    cfg = LlamaConfig(**BASE)
    model = Llama(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
    tensors = lp.params_to_hf(cfg, params)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        lp.params_from_hf(cfg, tensors, tensors.__getitem__)


def test_unknown_source_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline package"):
        jm.load("no-such-org/no-such-model")


def test_presets_select_the_projections():
    model = Llama(LlamaConfig(**BASE))
    params = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
    for name, count in (("attention", 8), ("all-linear", 14)):
        cfg = jlora.AdapterConfig(method="lora", rank=2, targets=jm.preset(model, name))
        assert len(jlora.init(cfg, params)[1]) == count
    with pytest.raises(ValueError, match="preset 'mlp'"):
        jm.preset(model, "mlp")


def test_load_llama2c_fixture_generates_story():
    import pathlib

    path = pathlib.Path(__file__).parent / "fixtures" / "stories260K" / "stories260K.bin"
    model, params, tok = jm.load(path)
    out = jm.generate(model, params, [[tok.bos_token_id]], max_new_tokens=20)
    assert tok.decode(np.asarray(out[0]).tolist()).startswith("Once upon a time")
