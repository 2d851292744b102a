"""Adapter export: jlora-format round trips for every method variant, and PEFT LoRA folders that
`peft.PeftModel.from_pretrained` loads onto the ORIGINAL transformers model with the logits of the
jlora-adapted model (tiny BERT classifier and Llama decoder). Torch/PEFT tests skip cleanly."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, hf_twin, make_config, tiny_model

import jlora
import jlora.models as jm
from jlora import persist, targets
from jlora.errors import CheckpointError
from jlora.interop import peft as jpeft
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
    layouts = jlora.stacked_layouts(params)
    return cfg, *jlora.init(cfg, params, jax.random.key(0), grads=grads, layouts=layouts)


def _batch(vocab: int):
    ids = np.random.RandomState(0).randint(3, vocab, SEQ)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


# --- jlora format -------------------------------------------------------------------------------


def _round_trip(folder, base, adapters, cfg, **kwargs):
    """save → load gives equal specs, config, leaves, pytree structure and merged kernels."""
    loaded, cfg2, extra, meta = persist.load_adapters(
        persist.save_adapters(folder, adapters, cfg, **kwargs)
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
        folder = persist.save_adapters(tmp_path / variant, adapters, cfg)
        sizes[variant] = (folder / persist.JLORA_FILE).stat().st_size
    # NOLA stores k + l = 28 numbers per matrix whether or not the bases were cached, LoRA r = 4
    # stores 4·(d_in + d_out) = 256 (3 matrices; measured: LoRA 3.3 kB, NOLA 0.5 kB).
    assert sizes["nola"] == sizes["nola_cache"]
    assert sizes["nola"] * 5 < sizes["lora"], sizes


def _as_version_1(folder, cfg, adapters) -> None:
    """Rewrites a folder's adapter_config.json as version 1 wrote it: every method's options in
    the config, method-specific fields (nola_seed, ranks, ...) and derived ones in each spec."""
    file = folder / persist.CONFIG_FILE
    doc = json.loads(file.read_text())
    doc["version"] = 1
    defaults = {}
    for method in ("lora", "pissa", "nlora", "nola", "gora"):
        defaults.update(jlora.METHODS[method].options_class().to_flat())
    doc["config"] = {**persist._jsonable(defaults), **doc["config"]}
    for p, entry in doc["targets"].items():
        spec, a = entry["spec"], adapters[p].spec
        options, info, seed = spec.pop("options"), spec.pop("info"), spec.pop("seed")
        spec.update(
            trainable=list(a.trainable),
            lr_ratios=[list(x) for x in a.lr_ratios],
            residual=a.residual,
            nola_seed=seed,
            nola_num_basis=options.get("nola_num_basis"),
            ranks=info.get("ranks"),
            budget=info.get("budget"),
        )
    file.write_text(json.dumps(doc))


@pytest.mark.parametrize("variant", ["nola_cache", "gora", "nlora_pinv"])
def test_load_adapters_reads_version_1(tmp_path, stacked_params, variant):
    cfg, _base, adapters = _init(variant, stacked_params, targets="layers/mlp/kernel")
    adapters = _perturb(adapters)
    folder = persist.save_adapters(tmp_path / variant, adapters, cfg)
    _as_version_1(folder, cfg, adapters)
    loaded, cfg2, _, _ = persist.load_adapters(folder)
    assert cfg2 == cfg
    for p, a in adapters.items():
        assert loaded[p].spec == a.spec
        for name, leaf in a.params.items():
            np.testing.assert_array_equal(loaded[p].params[name], leaf, err_msg=f"{p} {name}")


def test_load_adapters_rejects_peft_folder(tmp_path):
    (tmp_path / persist.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="format=None"):
        persist.load_adapters(tmp_path)


def _damage(folder, edit_tensors=None, edit_doc=None):
    """Rewrites a saved jlora folder: `edit_tensors(dict)` / `edit_doc(dict)` change it in place."""
    from safetensors.numpy import load_file, save_file

    if edit_tensors is not None:
        tensors = load_file(str(folder / persist.JLORA_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(folder / persist.JLORA_FILE))
    if edit_doc is not None:
        doc = json.loads((folder / persist.CONFIG_FILE).read_text())
        edit_doc(doc)
        (folder / persist.CONFIG_FILE).write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize(
    ("variant", "leaf", "wrong", "want"),
    [
        ("lora", "A", (24, 5), (24, 4)),
        ("slora", "M", (4, 5), (4, 4)),
        ("nola", "beta", (11,), (12,)),
    ],
)
def test_load_adapters_checks_tensor_shapes(tmp_path, stacked_params, variant, leaf, wrong, want):
    cfg, _, adapters = _init(variant, stacked_params, targets="proj/kernel")
    folder = persist.save_adapters(tmp_path, adapters, cfg)
    key = f"proj/kernel::{leaf}"
    _damage(folder, lambda t: t.update({key: np.zeros(wrong, np.float32)}))
    match = f"adapters.safetensors: tensor '{key}' has shape {wrong}, expected {want}"
    with pytest.raises(CheckpointError, match=re.escape(match)):
        persist.load_adapters(folder)


def test_load_adapters_checks_tensors_against_the_saved_spec(tmp_path, stacked_params):
    """A config edited to rank 3 no longer fits the rank-4 tensors."""
    cfg, _, adapters = _init("lora", stacked_params, targets="layers/mlp/kernel")
    folder = persist.save_adapters(tmp_path, adapters, cfg)
    _damage(folder, edit_doc=lambda d: d["targets"]["layers/mlp/kernel"]["spec"].update(rank=3))
    with pytest.raises(CheckpointError, match=r"'layers/mlp/kernel::A' has shape \(3, 40, 4\), "):
        persist.load_adapters(folder)


def _drop(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_drop("proj/kernel::B"), r"lacks tensor 'proj/kernel::B' of target 'proj/kernel'"),
        (_drop("extra::embed/embedding"), r"lacks tensor 'extra::embed/embedding'"),
        (
            lambda t: t.update({"proj/kernel::C": np.zeros(3, np.float32)}),
            r"unexpected tensors \['proj/kernel::C'\]",
        ),
        (
            lambda t: t.update({"proj/kernel::A": np.zeros((24, 4), np.int32)}),
            r"tensor 'proj/kernel::A' has dtype int32, expected float32",
        ),
    ],
    ids=["missing", "missing_extra", "unexpected", "dtype"],
)
def test_load_adapters_rejects_damaged_tensors(tmp_path, stacked_params, edit, match):
    cfg, _, adapters = _init("lora", stacked_params, targets="proj/kernel")
    head = {"embed": stacked_params["embed"]}
    folder = persist.save_adapters(tmp_path, adapters, cfg, extra_params=head)
    with pytest.raises(CheckpointError, match=match):
        persist.load_adapters(_damage(folder, edit))


def _poisoned(adapters, path, leaf, value):
    a = adapters[path]
    return {**adapters, path: a.replace(params={**a.params, leaf: a.params[leaf].at[0].set(value)})}


def test_save_adapters_refuses_non_finite(tmp_path, stacked_params):
    cfg, _, adapters = _init("lora", stacked_params, targets="proj/kernel")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"adapters\['proj/kernel'\] leaf 'B' .* NaN"):
        persist.save_adapters(out, _poisoned(adapters, "proj/kernel", "B", np.nan), cfg)
    head = {"embed": {"embedding": stacked_params["embed"]["embedding"].at[1, 2].set(np.inf)}}
    with pytest.raises(CheckpointError, match=r"extra_params 'embed/embedding' .* 1 Inf of 240"):
        persist.save_adapters(out, adapters, cfg, extra_params=head)
    assert not out.exists()


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
        jpeft.to_peft(small_bert, _perturb(initial), tmp_path)
    _, _, other = _init(variant, stacked_params, targets="proj/kernel", rank=2)
    with pytest.raises(ValueError, match=r"initial_adapters\['proj/kernel'\].spec=.* differs"):
        jpeft.to_peft(small_bert, _perturb(initial), tmp_path, initial_adapters=other)


def test_to_peft_rejects_stacked_kernels(tmp_path, small_bert, stacked_params):
    _, _, adapters = _init("lora", stacked_params, targets=r"layers/mlp/kernel")
    with pytest.raises(ValueError, match="stacked kernel"):
        jpeft.to_peft(small_bert, adapters, tmp_path)


def test_to_peft_refuses_a_model_outside_jlora_models(tmp_path, stacked_params):
    class Foreign:  # looks like a jlora model, but no family module serves it
        family = "llama"
        config = tiny_model("llama").config

    _, _, adapters = _init("lora", stacked_params, targets="proj/kernel")
    with pytest.raises(ValueError, match=r"model=Foreign: to_peft exports .* jlora.models"):
        jpeft.to_peft(Foreign(), adapters, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_core_imports_no_model_family():
    """Persistence is core (issue 12, part 4): `jlora` and `jlora.persist` load no model family
    and no interop module; `jlora.interop.peft` asks the model's family for HF module names."""
    code = (
        "import sys, jlora, jlora.persist; print(sorted(m for m in sys.modules if "
        "m.startswith(('jlora.models', 'jlora.interop', 'jlora.train'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_the_core_knows_no_module_system():
    """Issue 15's layout: the core (`jlora/*.py` but the package's `__init__`, `jlora.methods`,
    `jlora.quant`) imports neither Flax's module systems nor jlora's wings at module level; what
    knows Linen or NNX lives in `jlora/linen/` and `jlora/nnx/`."""
    import ast

    root = pathlib.Path(jlora.__file__).parent
    core = [p for p in root.glob("*.py") if p.name != "__init__.py"]
    core += [*root.glob("methods/*.py"), *root.glob("quant/*.py")]
    wings = ("flax.linen", "flax.nnx", "jlora.linen", "jlora.nnx")
    found = []
    for path in core:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith(wings)]
    assert len(core) > 15 and found == []


def test_jlora_export_is_a_deprecated_alias():
    import jlora.export

    with pytest.warns(DeprecationWarning, match=r"jlora\.persist\.save_adapters"):
        assert jlora.export.save_adapters is persist.save_adapters
    with pytest.warns(DeprecationWarning, match=r"jlora\.interop\.peft\.to_peft"):
        assert jlora.export.to_peft is jpeft.to_peft
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jlora.export.nope  # noqa: B018


@pytest.fixture(scope="module")
def small_bert_adapters(small_bert):
    params = small_bert.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
    _, _, adapters = _init("slora", params, targets=jm.preset(small_bert, "attention"))
    return params, adapters


def test_to_peft_refuses_non_finite(tmp_path, small_bert, small_bert_adapters):
    params, adapters = small_bert_adapters
    path = next(iter(adapters))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"adapters\['{path}'\] leaf 'A' .* Inf"):
        jpeft.to_peft(small_bert, _poisoned(adapters, path, "A", np.inf), out)
    head = {"classifier": {**params["classifier"], "bias": jnp.array([0.0, np.nan])}}
    with pytest.raises(CheckpointError, match=r"extra_params 'classifier/bias' .* NaN"):
        jpeft.to_peft(small_bert, adapters, out, extra_params=head)
    # Finite float32 leaves whose fold lora_B = (M @ B)ᵀ overflows float32.
    huge = _poisoned(_poisoned(adapters, path, "M", 3e38), path, "B", 3e38)
    with pytest.raises(CheckpointError, match=r"'base_model\.model\..*\.lora_B\.weight' .* Inf"):
        jpeft.to_peft(small_bert, huge, out)
    assert not out.exists()


# --- PEFT format: logits of PeftModel.from_pretrained --------------------------------------------


def _pair(tm, model, params, vocab: int):
    """The torch model, the jlora model, its params, a batch, and a jitted apply (compiled once:
    merged parameters have the same shapes for every method)."""
    apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    return tm, model, params, _batch(vocab), apply


@pytest.fixture(scope="module")
def bert_pair():
    # One kernel shape (intermediate 32 = hidden): few compiles.
    _, _, tm, model, params = hf_twin("bert", intermediate_size=32)
    return _pair(tm, model, params, 100)


@pytest.fixture(scope="module")
def llama_pair():
    # (32, 16) k/v kernels and intermediate 32: two kernel shapes keep compiles few.
    _, _, tm, model, params = hf_twin("llama", intermediate_size=32)
    return _pair(tm, model, params, 64)


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
    folder = jpeft.to_peft(model, adapters, tmp_path, initial_adapters=initial, extra_params=extra)
    ref = _peft_logits(torch, tm, folder, ids, mask)
    valid = mask.astype(bool) if ref.ndim == 3 else slice(None)
    err = float(np.abs(ours - ref)[valid].max())
    # The adapters alone do change the model.
    moved = np.abs(np.asarray(apply(merged, ids, mask)) - np.asarray(apply(params, ids, mask)))
    assert err <= 1e-4, (variant, err)
    assert moved[valid].max() > 1e-3, (variant, moved.max())
    _round_trip(tmp_path / "jlora", base, adapters, cfg)  # 2-D kernels, exact
    return json.loads((folder / persist.CONFIG_FILE).read_text())


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
    ours = jpeft.to_peft(
        model,
        adapters,
        tmp_path / "ours",
        extra_params={"classifier": params["classifier"], "pooler": params["pooler"]},
    )
    c = json.loads((ours / persist.CONFIG_FILE).read_text())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(ours))
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / jpeft.PEFT_FILE))
    mine = load_file(str(ours / jpeft.PEFT_FILE))
    assert set(theirs) == set(mine)
    for k in mine:
        np.testing.assert_array_equal(theirs[k], mine[k], err_msg=k)
    saved = json.loads((tmp_path / "peft" / persist.CONFIG_FILE).read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert saved[field] == c[field], field
