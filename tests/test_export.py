"""Adapter export: jlora-format round trips for every method variant, and PEFT LoRA folders that
`peft.PeftModel.from_pretrained` loads onto the ORIGINAL transformers model with the logits of the
jlora-adapted model (tiny BERT classifier and Llama decoder). Torch/PEFT tests skip cleanly."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, make_config

import jlora
import jlora.models as jm
from jlora import export, targets
from jlora.models.bert import Bert, BertConfig

SEQ = (3, 7)
# Every algorithm on both models; NOLA regenerates its bases on BERT and caches them on Llama
# (`to_peft` and `load_adapters` take both paths). pissa_rand and nlora_random fold exactly like
# pissa and nlora_pinv; the jlora-format tests cover every variant.
_COMMON = ["lora", "lora_gaussian_rs", "pissa", "slora", "nlora", "nlora_pinv", "inttune", "gora"]
BERT_VARIANTS = [*_COMMON, "nola"]
LLAMA_VARIANTS = [*_COMMON, "nola_cache"]


def _perturb(adapters: jlora.Adapters, seed: int = 11, scale: float = 1e-2) -> jlora.Adapters:
    """Simulated training: small Gaussian noise on every trainable leaf (NumPy: no compiles)."""
    rng, out = np.random.default_rng(seed), {}
    for p, a in adapters.items():
        leaves = dict(a.params)
        for name in a.spec.trainable:
            x = leaves[name]
            leaves[name] = jnp.asarray(x + scale * rng.standard_normal(x.shape), x.dtype)
        out[p] = a.replace(params=leaves)
    return out


def _perturb_tree(tree, seed: int = 5, scale: float = 1e-1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape), x.dtype), tree
    )


def _init(variant: str, params, **overrides):
    """`jlora.init` of a variant; GoRA gets random 'pre-pass gradients' for every kernel."""
    cfg = make_config(variant, **overrides)
    grads = None
    if cfg.method == "gora":
        rng = np.random.default_rng(3)
        flat = targets.flatten(params)
        grads = {
            p: rng.standard_normal(v.shape, np.float32)
            for p, v in flat.items()
            if targets.is_kernel(p, v)
        }
    return cfg, *jlora.init(cfg, params, jax.random.key(0), grads=grads)


def _batch(vocab: int):
    ids = np.random.RandomState(0).randint(3, vocab, SEQ)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


# --- jlora format -------------------------------------------------------------------------------


def _round_trip(folder, base, adapters, cfg, **kwargs):
    """save → load gives equal specs, config, leaves, pytree structure and merged kernels."""
    loaded, cfg2, extra, meta = export.load_adapters(
        export.save_adapters(folder, adapters, cfg, **kwargs)
    )
    assert cfg2 == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for p, a in adapters.items():
        assert loaded[p].spec == a.spec
        for name, leaf in a.params.items():
            assert loaded[p].params[name].dtype == leaf.dtype
            np.testing.assert_array_equal(loaded[p].params[name], leaf, err_msg=f"{p} {name}")
    merged, merged2 = jlora.merge(base, adapters), jlora.merge(base, loaded)
    jax.tree.map(np.testing.assert_array_equal, merged2, merged)
    return extra, meta


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jlora_format_round_trip(tmp_path, stacked_params, variant):
    # The stacked (3, 40, 24) kernel: nested GoRA ranks/scales, per-matrix NOLA bases (2-D
    # kernels round-trip in the PEFT tests below).
    cfg, base, adapters = _init(variant, stacked_params, targets="layers/mlp/kernel")
    head = {"embed": stacked_params["embed"]}
    extra, meta = _round_trip(
        tmp_path, base, _perturb(adapters), cfg, extra_params=head, metadata={"step": 3}
    )
    assert meta == {"step": 3}
    jax.tree.map(np.testing.assert_array_equal, extra, head)


def test_jlora_format_nola_stores_only_coefficients(tmp_path, stacked_params):
    sizes = {}
    for variant in ("lora", "nola", "nola_cache"):
        cfg, _, adapters = _init(variant, stacked_params, targets="layers/mlp/kernel")
        folder = export.save_adapters(tmp_path / variant, adapters, cfg)
        sizes[variant] = (folder / export.JLORA_FILE).stat().st_size
    # NOLA stores k + l = 28 numbers per matrix whether or not the bases were cached, LoRA r = 4
    # stores 4·(d_in + d_out) = 256 (3 matrices; measured: LoRA 3.3 kB, NOLA 0.5 kB).
    assert sizes["nola"] == sizes["nola_cache"]
    assert sizes["nola"] * 5 < sizes["lora"], sizes


def test_load_adapters_rejects_peft_folder(tmp_path):
    (tmp_path / export.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="format=None"):
        export.load_adapters(tmp_path)


# --- PEFT format: errors (no torch needed) ------------------------------------------------------


@pytest.fixture(scope="module")
def small_bert():
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=2,
    )
    return Bert(cfg)


@pytest.mark.parametrize("variant", ["pissa", "nlora_pinv"])
def test_to_peft_residual_needs_initial_adapters(tmp_path, small_bert, stacked_params, variant):
    _, _, initial = _init(variant, stacked_params, targets="proj/kernel")
    with pytest.raises(ValueError, match=r"initial_adapters lacks 'proj/kernel': .* rewrote"):
        export.to_peft(small_bert, _perturb(initial), tmp_path)
    _, _, other = _init(variant, stacked_params, targets="proj/kernel", rank=2)
    with pytest.raises(ValueError, match=r"initial_adapters\['proj/kernel'\].spec=.* differs"):
        export.to_peft(small_bert, _perturb(initial), tmp_path, initial_adapters=other)


def test_to_peft_rejects_stacked_kernels(tmp_path, small_bert, stacked_params):
    _, _, adapters = _init("lora", stacked_params, targets=r"layers/mlp/kernel")
    with pytest.raises(ValueError, match="stacked kernel"):
        export.to_peft(small_bert, adapters, tmp_path)


# --- PEFT format: logits of PeftModel.from_pretrained --------------------------------------------


def _randomise(torch, model, std: float) -> None:
    """Pretrained-like magnitudes: every weight and bias non-trivial."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm.weight" in n or "norm.weight" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def _pair(tm, model, params, vocab: int):
    """The torch model, the jlora model, its params, a batch, and a jitted apply (compiled once:
    merged parameters have the same shapes for every method)."""
    apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    return tm, model, params, _batch(vocab), apply


@pytest.fixture(scope="module")
def bert_pair():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import transformers

    from jlora.models.bert import config_from_hf, params_from_hf

    hf_cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,  # one kernel shape: few compiles (Llama has non-square k/v)
        max_position_embeddings=16,
        num_labels=2,
    )
    tm = transformers.BertForSequenceClassification(hf_cfg).eval()
    _randomise(torch, tm, 0.1)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    cfg = config_from_hf(hf_cfg.to_dict(), num_labels=2)
    return _pair(tm, Bert(cfg), params_from_hf(cfg, sd, sd.__getitem__), 100)


@pytest.fixture(scope="module")
def llama_pair():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import transformers

    from jlora.models.llama import Llama
    from jlora.models.llama import params as lp

    hf_cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # (32, 16) k/v kernels; two kernel shapes keep compiles few
        max_position_embeddings=16,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = transformers.LlamaForCausalLM(hf_cfg).eval()
    _randomise(torch, tm, 0.1)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = lp.config_from_hf(hf_cfg.to_dict())
    return _pair(tm, Llama(cfg), lp.params_from_hf(cfg, sd, sd.__getitem__), 64)


def _peft_logits(torch, tm, folder, ids, mask):
    import peft

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(folder)).eval()
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    return out.numpy()


def _check_peft(tmp_path, pair, variant, head: tuple[str, ...]):
    torch = pytest.importorskip("torch")
    tm, model, params, (ids, mask), apply = pair
    cfg, base, initial = _init(variant, params, targets=jm.preset(model, "all-linear"))
    adapters = _perturb(initial)
    extra = _perturb_tree({k: params[k] for k in head}) if head else None
    merged = jlora.merge(base, adapters)
    ours = np.asarray(apply({**merged, **(extra or {})}, ids, mask))
    folder = export.to_peft(model, adapters, tmp_path, initial_adapters=initial, extra_params=extra)
    ref = _peft_logits(torch, tm, folder, ids, mask)
    valid = mask.astype(bool) if ref.ndim == 3 else slice(None)
    err = float(np.abs(ours - ref)[valid].max())
    # The adapters alone do change the model.
    moved = np.abs(np.asarray(apply(merged, ids, mask)) - np.asarray(apply(params, ids, mask)))
    assert err <= 1e-4, (variant, err)
    assert moved[valid].max() > 1e-3, (variant, moved.max())
    _round_trip(tmp_path / "jlora", base, adapters, cfg)  # 2-D kernels, exact
    return json.loads((folder / export.CONFIG_FILE).read_text())


@pytest.mark.parametrize("variant", BERT_VARIANTS)
def test_to_peft_bert_classifier_logits(tmp_path, bert_pair, variant):
    c = _check_peft(tmp_path, bert_pair, variant, head=("classifier", "pooler"))
    assert c["task_type"] == "SEQ_CLS"
    assert c["modules_to_save"] == ["bert.pooler", "classifier"]
    assert "bert.encoder.layer.1.output.dense" in c["target_modules"]
    assert len(c["target_modules"]) == 12


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_to_peft_llama_logits(tmp_path, llama_pair, variant):
    c = _check_peft(tmp_path, llama_pair, variant, head=())
    assert c["task_type"] == "CAUSAL_LM" and c["modules_to_save"] is None
    assert len(c["target_modules"]) == 14 and "model.layers.0.mlp.down_proj" in c["target_modules"]
    residual = VARIANTS[variant].get("nlora_core") == "pinv" or variant.startswith("pissa")
    if residual:
        assert c["r"] == 8  # rank 2r on the original base
    if variant == "gora":
        assert c["rank_pattern"] and c["alpha_pattern"]  # heterogeneous ranks


def test_peft_key_names_match_peft_save_pretrained(tmp_path, bert_pair):
    """Our key names are those PEFT's own `save_pretrained` writes for the same config."""
    pytest.importorskip("torch")
    import peft
    from safetensors.numpy import load_file

    tm, model, params, _, _ = bert_pair
    _, _, adapters = _init("gora", params, targets=jm.preset(model, "all-linear"))
    ours = export.to_peft(
        model,
        adapters,
        tmp_path / "ours",
        extra_params={"classifier": params["classifier"], "pooler": params["pooler"]},
    )
    c = json.loads((ours / export.CONFIG_FILE).read_text())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(ours))
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / export.PEFT_FILE))
    mine = load_file(str(ours / export.PEFT_FILE))
    assert set(theirs) == set(mine)
    for k in mine:
        np.testing.assert_array_equal(theirs[k], mine[k], err_msg=k)
    saved = json.loads((tmp_path / "peft" / export.CONFIG_FILE).read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert saved[field] == c[field], field
