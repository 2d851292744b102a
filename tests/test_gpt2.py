"""GPT-2 (`jlora.models.gpt2`) against transformers' `GPT2LMHeadModel` (PyTorch) on a tiny random
model saved with `save_pretrained`: logits (right and left padding), greedy and beam-search
generation, `save_hf` round trips, the original hub checkpoints' naming (no `transformer.`
prefix, attention-mask buffers), an untied head, scanned layers, and PEFT export of adapters on
the fused `c_attn` (Conv1D, `fan_in_fan_out=True`). Torch / PEFT tests skip cleanly."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import jlora
import jlora.models as jm
from jlora import persist, sharding
from jlora.errors import ModelFileError
from jlora.interop import peft as jpeft
from jlora.models.gpt2 import GPT2, PRESETS, GPT2Config
from jlora.models.gpt2 import params as gp
from jlora.models.gpt2.model import ACTIVATIONS
from jlora.models.scan import scanned

TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
EOS = 99  # GPT-2's one special token (<|endoftext|>), last in the tiny vocabulary
NEW = 10  # new tokens per generation test


def _randomise(torch, tm) -> None:
    """Pretrained-like magnitudes: every weight and bias non-trivial, norms near 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)


def _hf_model(**overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        **{**TINY, "bos_token_id": EOS, "eos_token_id": EOS}, **overrides
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _randomise(torch, tm)
    return torch, tm


def _batch():
    ids = np.random.RandomState(0).randint(0, EOS, (3, 9))
    right = np.ones_like(ids)
    right[1, 6:] = 0
    left = np.ones_like(ids)
    left[1, :4] = 0
    left[2, :1] = 0
    return ids, right, left


def _left_positions(mask: np.ndarray) -> np.ndarray:
    """transformers' `generate` position ids: cumulative count of real tokens, 0 on padding."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """`(torch, transformers model, its save_pretrained folder, jlora model, params, tokenizer,
    jitted apply)`: the folder also holds a tiny byte-level BPE tokenizer."""
    torch, tm = _hf_model()
    import transformers

    folder = tmp_path_factory.mktemp("gpt2")
    tm.save_pretrained(folder)
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ.,")}
    vocab["<|endoftext|>"] = EOS
    transformers.GPT2TokenizerFast(vocab=vocab, merges=[]).save_pretrained(folder)
    model, params, tok = jm.load(folder)
    apply = jax.jit(lambda p, ids, mask, pos: model.apply({"params": p}, ids, mask, positions=pos))
    return torch, tm, folder, model, params, tok, apply


def _torch_logits(torch, tm, ids, mask, positions=None):
    with torch.no_grad():
        return tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions),
        ).logits.numpy()


# --- loading and logits -------------------------------------------------------------------------


def test_load_folder_and_logits_match_transformers(gpt2):
    torch, tm, _, model, params, tok, apply = gpt2
    assert isinstance(model, GPT2) and model.family == "gpt2"
    assert model.config == GPT2Config(**TINY, bos_token_id=EOS, eos_token_id=EOS)
    assert params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 96)
    assert "lm_head" not in params  # tied: the head is wte.attend
    assert tok("ab c").input_ids == [0, 1, 26, 2] and tok.eos_token_id == EOS
    ids, right, left = _batch()
    full = np.ones_like(ids)
    for mask, pos in ((full, None), (right, None), (left, _left_positions(left))):
        ref = _torch_logits(torch, tm, ids, mask, pos)
        out = np.asarray(apply(params, ids, mask, pos))
        assert out.shape == ref.shape == (3, 9, 100)
        assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_load_on_a_one_device_mesh_is_the_plain_load(gpt2):
    *_, folder, model, params, _, _ = gpt2
    mesh = sharding.make_mesh(sharding.MeshShape(), jax.devices()[:1])
    _, got, _ = jm.load(folder, mesh=mesh)  # `Lazy` tensors through the placer
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        assert isinstance(a.sharding, jax.sharding.NamedSharding)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jm.sharding_rules(model) == gp.SHARDING


def test_hub_checkpoint_names_and_buffers_load(gpt2, tmp_path, caplog):
    """openai-community/gpt2's layout: `GPT2Model` names without `transformer.`, plus the
    causal-mask buffers `h.N.attn.bias` / `h.N.attn.masked_bias`, ignored silently."""
    from safetensors.numpy import save_file

    *_, folder, model, params, _, _ = gpt2
    hf = gp.params_to_hf(model.config, params)
    tensors = {k.removeprefix("transformer."): v for k, v in hf.items()}
    assert "h.0.attn.c_attn.bias" in tensors and "wte.weight" in tensors
    for i in range(TINY["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with caplog.at_level(logging.WARNING):
        model, got, tok = jm.load(tmp_path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert tok is None and model.config.n_layer == 2
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_untied_head_scaled_layers_and_scan(tmp_path):
    """An untied `lm_head`, `scale_attn_by_inverse_layer_idx`, another activation and MLP width:
    logits, save_hf into transformers, and the scanned model (layer index scanned over)."""
    torch, tm = _hf_model(
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
        activation_function="relu",
        n_inner=48,
    )
    import transformers

    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert "lm_head.weight" in sd
    cfg = gp.config_from_hf(tm.config.to_dict())
    assert (cfg.tie_word_embeddings, cfg.scale_attn_by_inverse_layer_idx) == (False, True)
    model, params = GPT2(cfg), gp.params_from_hf(cfg, sd, sd.__getitem__)
    assert params["lm_head"]["kernel"].shape == (32, 100)
    ids, right, _ = _batch()
    ref = _torch_logits(torch, tm, ids, right)
    out = np.asarray(model.apply({"params": params}, ids, right))
    assert np.abs(out - ref)[right.astype(bool)].max() <= 1e-4

    jm.save_hf(tmp_path, model, params)
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    again = _torch_logits(torch, loaded.eval(), ids, right)
    assert np.abs(out - again)[right.astype(bool)].max() <= 1e-4

    ms, ps = scanned(model, params)
    assert ps["transformer"]["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
    assert rel_err(ms.apply({"params": ps}, ids, right), out) <= 1e-5
    stacked = [jlora.Rule(pattern=jm.preset(ms, "all-linear"))]
    assert len(jlora.targets.select(ps, stacked, 2, 4.0, jlora.stacked_layouts(ps))) == 4


def test_save_hf_round_trip(gpt2, tmp_path):
    torch, _, _, model, params, tok, apply = gpt2
    import transformers

    jm.save_hf(tmp_path, model, params, tok)
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info
    ids, right, _ = _batch()
    ref = _torch_logits(torch, loaded.eval(), ids, right)
    assert (
        np.abs(np.asarray(apply(params, ids, right, None)) - ref)[right.astype(bool)].max() <= 1e-4
    )
    again, params2, tok2 = jm.load(tmp_path)
    assert again.config == model.config and tok2("ab c").input_ids == [0, 1, 26, 2]
    jax.tree.map(np.testing.assert_array_equal, params2, params)


# --- generation ---------------------------------------------------------------------------------


def _stop_token(model, params, ids, left) -> int:
    """A token greedy decoding emits (row 2's fourth new token), so that with it as GPT-2's
    end-of-text rows end early, at different steps."""
    free = jm.generate(model, params, ids, left, max_new_tokens=NEW, stop_tokens=())
    return int(np.asarray(free)[2, ids.shape[1] + 3])


def _hf_generate(torch, tm, ids, left, eos, **settings):
    with torch.no_grad():
        return tm.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(left),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=eos,  # GPT-2 has no pad token: transformers' usual choice
            eos_token_id=eos,
            **settings,
        ).numpy()


@pytest.fixture(scope="module")
def stop(gpt2):
    _, _, _, model, params, _, _ = gpt2
    ids, _, left = _batch()
    return _stop_token(model, params, ids, left)


def test_greedy_generate_matches_transformers_with_left_padding(gpt2, stop):
    torch, tm, _, model, params, _, _ = gpt2
    ids, _, left = _batch()
    ref = _hf_generate(torch, tm, ids, left, stop)
    out = np.asarray(jm.generate(model, params, ids, left, max_new_tokens=NEW, stop_tokens=[stop]))
    n = ref.shape[1]  # transformers stops once every row has ended
    np.testing.assert_array_equal(out[:, :n], ref)
    assert (out[:, n:] == stop).all()
    ends = [np.flatnonzero(row == stop)[0] for row in ref[:, ids.shape[1] :] if stop in row]
    assert len(set(ends)) > 1, ends  # stopping is exercised, rows ending at different steps


def test_beam_search_matches_transformers(gpt2, stop):
    """The LoRA / NOLA E2E decoding knobs (smaller): 4 beams, length penalty 0.9, no repeated
    bigrams, GPT-2's end-of-text as both stop and pad token, a left-padded batch."""
    torch, tm, _, model, params, _, _ = gpt2
    ids, _, left = _batch()
    settings = dict(num_beams=4, length_penalty=0.9, no_repeat_ngram_size=2, early_stopping=False)
    ref = _hf_generate(torch, tm, ids, left, stop, **settings)
    out = np.asarray(
        jm.generate(model, params, ids, left, max_new_tokens=NEW, stop_tokens=[stop], **settings)
    )
    n = ref.shape[1]
    np.testing.assert_array_equal(out[:, :n], ref)
    assert (out[:, n:] == stop).all()
    assert (ref[:, ids.shape[1] :] == stop).any()  # a returned hypothesis stopped


# --- adapters and PEFT --------------------------------------------------------------------------


def test_presets_and_sharding():
    cfg = GPT2Config(**TINY, tie_word_embeddings=False)
    shapes = jax.eval_shape(lambda: GPT2(cfg).init(jax.random.key(0), jnp.ones((1, 2), jnp.int32)))[
        "params"
    ]
    kernels = [p for p, v in jlora.targets.flatten(shapes).items() if p.endswith("/kernel")]
    pick = {n: [k for k in kernels if re.fullmatch(PRESETS[n], k)] for n in PRESETS}
    assert pick["attention"] == [f"transformer/h_{i}/attn/c_attn/kernel" for i in range(2)]
    assert len(pick["all-linear"]) == 8 and set(kernels) - set(pick["all-linear"]) == {
        "lm_head/kernel"
    }
    assert jm.preset("gpt2", "attention") == jm.preset(GPT2(cfg), "attention")
    specs = sharding.param_specs(shapes, gp.SHARDING, {"data": 1, "fsdp": 2, "tensor": 4})
    h0 = specs["transformer"]["h_0"]
    assert h0["attn"]["c_attn"]["kernel"] == sharding.P("fsdp", "tensor")
    assert h0["mlp"]["c_proj"]["kernel"] == sharding.P("tensor", "fsdp")
    assert specs["transformer"]["wpe"]["embedding"] == sharding.P(None, None)  # replicated


def _trained(adapters: jlora.Adapters, scale: float = 0.05) -> jlora.Adapters:
    """Simulated training: noise on every trainable leaf (LoRA's B leaves zero)."""
    rng, out = np.random.default_rng(3), {}
    for p, a in adapters.items():
        leaves = dict(a.params)
        for name in a.spec.trainable:
            x = np.asarray(leaves[name])
            leaves[name] = jnp.asarray(x + scale * rng.standard_normal(x.shape), jnp.float32)
        out[p] = a.replace(params=leaves)
    return out


@pytest.mark.parametrize(("method", "preset"), [("lora", "attention"), ("dora", "all-linear")])
def test_to_peft_matches_peft_model_on_conv1d(gpt2, tmp_path, method, preset):
    """PEFT wraps GPT-2's Conv1D with fan_in_fan_out=True and reads in/out features from the
    (in, out) weight: lora_A / lora_B (and DoRA's per-output magnitude) keep their Linear
    shapes, and `PeftModel.from_pretrained` gives jlora's factored logits."""
    torch, tm, _, model, params, _, apply = gpt2
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    cfg = jlora.AdapterConfig(method=method, rank=4, alpha=8, targets=jm.preset(model, preset))
    base, adapters = jlora.init(cfg, params, 0)
    adapters = _trained(adapters)
    ids, right, _ = _batch()

    @jax.jit
    def factored(base, adapters):
        with jlora.inject(adapters):
            return model.apply({"params": base}, ids, right)

    ours = np.asarray(factored(base, adapters))
    folder = jpeft.to_peft(model, adapters, tmp_path / "ours")
    c = json.loads((folder / persist.CONFIG_FILE).read_text())
    assert c["fan_in_fan_out"] is True and c["task_type"] == "CAUSAL_LM"
    assert c["use_dora"] is (method == "dora")
    assert "transformer.h.1.attn.c_attn" in c["target_modules"]
    assert len(c["target_modules"]) == (2 if preset == "attention" else 8)
    stored = load_file(str(folder / jpeft.PEFT_FILE))
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    assert stored[prefix + "lora_A.weight"].shape == (4, 32)  # (r, in)
    assert stored[prefix + "lora_B.weight"].shape == (96, 4)  # (out, r): [q | k | v]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(folder)).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    ref = _torch_logits(torch, pm, ids, right)
    valid = right.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    moved = np.abs(np.asarray(apply(params, ids, right, None)) - ref)[valid].max()
    assert moved > 1e-3
    # PEFT's own save_pretrained writes the same tensors under the same names.
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / jpeft.PEFT_FILE))
    assert set(theirs) == set(stored)
    for k in stored:
        np.testing.assert_array_equal(theirs[k], stored[k], err_msg=k)


# --- configs and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_are_transformers(name):
    torch = pytest.importorskip("torch")
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 101, dtype=np.float32)
    want = ACT2FN[name](torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](jnp.asarray(x))), want, atol=2e-6)


def test_config_round_trip_and_defaults():
    cfg = GPT2Config(**TINY, n_inner=40, eos_token_id=(3, 4))
    assert gp.config_from_hf(gp.config_to_hf(cfg)) == cfg
    assert gp.config_from_hf({"model_type": "gpt2"}) == GPT2Config()  # GPT-2 small
    generic = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    assert gp.config_from_hf(generic).n_embd == 32
    assert jm.hub.family_of("gpt2") is gp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_embd=16, n_head=5), r"GPT2Config\.n_head=5: expected a divisor of n_embd=16"),
        (dict(activation_function="geglu"), r"GPT2Config\.activation_function='geglu': expected"),
        (dict(n_layer=0), r"GPT2Config\.n_layer=0: expected an integer >= 1"),
        (dict(n_inner=0), r"GPT2Config\.n_inner=0: expected None"),
        (dict(model_type="llama"), r"GPT2Config\.model_type='llama': expected 'gpt2'"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**{**TINY, **kwargs})


def test_config_from_hf_refuses_cross_attention():
    with pytest.raises(ValueError, match=r"add_cross_attention=True: .* decoder-only"):
        gp.config_from_hf({"model_type": "gpt2", "add_cross_attention": True})


def test_missing_or_misshapen_tensor_is_named(gpt2, tmp_path):
    from safetensors.numpy import save_file

    *_, folder, model, params, _, _ = gpt2
    tensors = gp.params_to_hf(model.config, params)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        gp.params_from_hf(model.config, tensors, tensors.__getitem__)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelFileError, match=r"lacks 1 tensor\(s\).*h\.1\.mlp\.c_fc\.bias"):
        jm.load(tmp_path)
    tensors = gp.params_to_hf(model.config, params)
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match=r"c_attn\.weight: shape \(96, 32\), expected \(32, 96\)"):
        gp.params_from_hf(model.config, tensors, tensors.__getitem__)
