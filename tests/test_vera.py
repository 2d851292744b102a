"""VeRA: the shared pair and its slices, options, exports, and parity with PEFT 0.21's VeRA.

PEFT draws the shared pair with PyTorch's generator and jlora with JAX's, so the parity tests copy
PEFT's `vera_A`/`vera_B` into jlora's cached leaves (`vera_basis="cache"`); the regenerated pair
is checked separately (its distribution against PEFT's, its slicing, cache = regenerate).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_twin
from safetensors.numpy import load_file

import jlora
import jlora.models as jm
from jlora import persist
from jlora.errors import ConfigError
from jlora.interop import peft as jpeft
from jlora.methods.vera import shared_pair

R = 4


def _cfg(**kw):
    return jlora.AdapterConfig(**{"method": "vera", "rank": R, **kw})


def _set_vectors(adapters, seed=0, scale=0.3):
    """Simulated training: random d and b (the same numbers go to PEFT)."""
    rng, out = np.random.default_rng(seed), {}
    for p, a in adapters.items():
        d = rng.standard_normal(a.params["d"].shape).astype(np.float32)
        b = (scale * rng.standard_normal(a.params["b"].shape)).astype(np.float32)
        out[p] = a.replace(params={**a.params, "d": jnp.asarray(d), "b": jnp.asarray(b)})
    return out


# --- without PyTorch ---------------------------------------------------------------------------


def test_options_and_scale():
    cfg = _cfg(alpha=32.0, rslora=True)
    assert cfg.options.d_initial == 0.1 and cfg.options.projection_prng_key == 0
    assert cfg.options.basis == "regenerate"
    assert cfg.scale(R, 32.0) == 1.0  # no alpha in VeRA, rsLoRA or not
    for kw, match in [
        (dict(vera_basis="share"), r"vera_basis='share' is invalid: expected 'regenerate' or"),
        (dict(vera_projection_prng_key=-1), r"vera_projection_prng_key=-1 is invalid"),
        (dict(vera_projection_prng_key=2**31), r"vera_projection_prng_key=2147483648"),
        (dict(vera_d_initial=float("nan")), r"vera_d_initial=nan is invalid"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**kw)
    with pytest.raises(ConfigError, match=r"vera_d_initial.*no such option for method 'lora'"):
        jlora.AdapterConfig(method="lora", vera_d_initial=1.0)


def test_shared_pair_sliced_per_target(stacked_params):
    # proj (24, 40) and the stacked mlp (3, 40, 24): the pair is drawn at max_in = max_out = 40.
    cfg = _cfg(targets="proj/kernel|layers/mlp/kernel", vera_d_initial=0.5, vera_basis="cache")
    base, ad = jlora.init(cfg, stacked_params, 0, layouts=jlora.stacked_layouts(stacked_params))
    assert base is stacked_params  # the frozen kernels stay as they are
    proj, mlp = ad["proj/kernel"], ad["layers/mlp/kernel"]
    for a in (proj, mlp):
        assert a.spec.seed == 0 and a.spec.scale == 1.0
        assert a.spec.info == (("max_in", 40), ("max_out", 40), ("max_rank", R))
    assert {n: x.shape for n, x in mlp.params.items()} == {
        "d": (3, R),
        "b": (3, 24),
        "A": (3, 40, R),
        "B": (3, R, 24),
    }
    assert mlp.spec.trainable == ("d", "b")
    np.testing.assert_array_equal(proj.params["d"], np.full(R, 0.5, np.float32))
    np.testing.assert_array_equal(proj.params["b"], np.zeros(40, np.float32))
    # One pair: vera_A[:, :d_in] and vera_B[:d_out, :] in PyTorch layout.
    vera_A, vera_B = shared_pair(proj.spec)
    assert vera_A.shape == (R, 40) and vera_B.shape == (40, R)
    other = shared_pair(dataclasses.replace(proj.spec, seed=7))  # another key, another pair
    assert not np.allclose(other[0], vera_A) and not np.allclose(other[1], vera_B)
    np.testing.assert_array_equal(proj.params["A"], vera_A[:, :24].T)
    np.testing.assert_array_equal(proj.params["B"], vera_B[:40, :].T)
    for i in range(3):
        np.testing.assert_array_equal(mlp.params["A"][i], vera_A.T)
        np.testing.assert_array_equal(mlp.params["B"][i], vera_B[:24, :].T)
    # ΔK = 0 at init; then ΔK_i = (A·d_i) @ (B·b_i) per stacked matrix.
    assert not np.any(jlora.delta(ad)["layers/mlp/kernel"])
    trained = _set_vectors(ad)
    m = trained["layers/mlp/kernel"].params
    want = np.stack(
        [
            (np.asarray(m["A"][i]) * m["d"][i]) @ (np.asarray(m["B"][i]) * m["b"][i][None])
            for i in (0, 1, 2)
        ]
    )
    np.testing.assert_allclose(
        jlora.delta(trained)["layers/mlp/kernel"], want, rtol=1e-5, atol=1e-6
    )


def test_regenerate_equals_cache_and_exports_store_only_vectors(tmp_path, stacked_params):
    targets = "proj/kernel"  # (24, 40); the stacked kernel is in the test above
    deltas, sizes = {}, {}
    for basis in ("regenerate", "cache"):
        cfg = _cfg(targets=targets, vera_basis=basis, vera_projection_prng_key=7)
        _, ad = jlora.init(cfg, stacked_params, 0, layouts=jlora.stacked_layouts(stacked_params))
        trained = _set_vectors(ad)
        deltas[basis] = jlora.delta(trained)
        folder = persist.save_adapters(tmp_path / basis, trained, cfg)
        stored = load_file(str(folder / persist.JLORA_FILE))
        assert sorted(stored) == sorted(f"{p}::{n}" for p in ad for n in ("b", "d")), basis
        sizes[basis] = (folder / persist.JLORA_FILE).stat().st_size
        loaded, cfg2, _, _ = persist.load_adapters(folder)
        assert cfg2 == cfg
        for p, a in trained.items():
            assert loaded[p].spec == a.spec
            for n, x in a.params.items():  # the cached pair comes back from the seed
                np.testing.assert_array_equal(loaded[p].params[n], x, err_msg=f"{basis} {p} {n}")
    assert sizes["regenerate"] == sizes["cache"]
    for p in deltas["cache"]:
        np.testing.assert_allclose(
            deltas["regenerate"][p], deltas["cache"][p], rtol=1e-6, atol=1e-7
        )


@pytest.mark.slow
def test_factored_merged_and_a_training_step(tiny):
    model, params, ids = tiny
    cfg = _cfg(targets=".*(query|value|up)/kernel")  # (32, 32) and (32, 48): max_out 48
    base, ad = jlora.init(cfg, params, 0)
    assert ad["block_0/up/kernel"].spec.get("max_out") == 48
    trained = _set_vectors(ad)
    merged = model.apply({"params": jlora.merge(base, trained)}, ids)
    with jlora.inject(trained):
        factored = model.apply({"params": base}, ids)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    # A few Adam steps on d and b lower a loss (b = 0 at init still gets a gradient).
    target = jax.random.normal(jax.random.key(4), merged.shape)
    trainable, frozen = jlora.split(ad)
    tx = jlora.optimizer(ad, optax.adam(1e-2))
    state = tx.init(trainable)

    @jax.jit
    def step(t, s):
        def loss(t):
            with jlora.inject(jlora.combine(t, frozen)):
                return jnp.mean((model.apply({"params": base}, ids) - target) ** 2)

        value, g = jax.value_and_grad(loss)(t)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s, value

    losses = []
    for _ in range(5):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0], losses


# --- parity with PEFT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_vera():
    """A tiny BERT classifier (FFN 48 ≠ hidden 32, so the pair is sliced) in PyTorch with PEFT's
    VeRA on every linear projection, and jlora's VeRA with PEFT's pair copied into its cache."""
    peft = pytest.importorskip("peft")
    torch, _, tm, model, params = hf_twin(
        "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    acfg = _cfg(targets=jm.preset(model, "all-linear"), vera_basis="cache")
    base, initial = jlora.init(acfg, params, 0)
    names = {p: jpeft.hf_module(model, jpeft._linen_module(p)) for p in initial}
    vcfg = peft.VeraConfig(
        r=R, target_modules=sorted(names.values()), projection_prng_key=0, d_initial=0.1
    )
    pm = peft.get_peft_model(copy.deepcopy(tm), vcfg).eval()
    layers = {p: pm.get_submodule(f"base_model.model.{m}") for p, m in names.items()}
    ids = np.random.RandomState(0).randint(3, 100, (3, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    labels = np.array([0, 1, 1])
    return dict(
        torch=torch,
        peft=peft,
        tm=tm,
        pm=pm,
        model=model,
        params=params,
        base=base,
        initial=initial,
        layers=layers,
        acfg=acfg,
        batch=(ids, mask, labels),
    )


def _peft_pair(pv):
    vera_A = pv["pm"].base_model.vera_A["default"].detach().numpy()
    vera_B = pv["pm"].base_model.vera_B["default"].detach().numpy()
    return vera_A, vera_B


def _with_peft_pair_and_vectors(pv, seed=1):
    """jlora adapters holding PEFT's pair; both sides get the same random d and b."""
    torch = pv["torch"]
    vera_A, vera_B = _peft_pair(pv)
    out = {}
    for p, a in _set_vectors(pv["initial"], seed).items():
        s = a.spec
        A, B = vera_A[: s.rank, : s.d_in].T, vera_B[: s.d_out, : s.rank].T
        out[p] = a.replace(params={**a.params, "A": jnp.asarray(A), "B": jnp.asarray(B)})
        layer = pv["layers"][p]
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(torch.tensor(np.asarray(a.params["d"])))
            layer.vera_lambda_b["default"].copy_(torch.tensor(np.asarray(a.params["b"])))
    return out


def _torch_logits(pv, module):
    torch = pv["torch"]
    ids, mask, _ = pv["batch"]
    with torch.no_grad():
        return module(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.slow
def test_peft_init_and_pair_distribution(peft_vera):
    pv = peft_vera
    vera_A, vera_B = _peft_pair(pv)
    spec = next(iter(pv["initial"].values())).spec
    assert (spec.get("max_rank"), spec.get("max_in")) == vera_A.shape
    assert (spec.get("max_out"), spec.get("max_rank")) == vera_B.shape
    for p, a in pv["initial"].items():
        layer = pv["layers"][p]
        np.testing.assert_array_equal(a.params["d"], layer.vera_lambda_d["default"].detach())
        np.testing.assert_array_equal(a.params["b"], layer.vera_lambda_b["default"].detach())
    # Same distribution: U(−√(6/fan_in), √(6/fan_in)) with fan_in the second axis.
    ours = shared_pair(spec)
    for x, y, fan_in in ((ours[0], vera_A, vera_A.shape[1]), (ours[1], vera_B, R)):
        bound = np.sqrt(6.0 / fan_in)
        for z in (np.asarray(x), y):
            assert np.abs(z).max() <= bound and np.abs(z).max() > 0.8 * bound
        assert abs(np.std(np.asarray(x)) / np.std(y) - 1) < 0.35


@pytest.mark.slow
def test_peft_forward_merge_and_gradients(peft_vera):
    pv = peft_vera
    torch, model, base, pm = pv["torch"], pv["model"], pv["base"], pv["pm"]
    adapters = _with_peft_pair_and_vectors(pv)
    ref = _torch_logits(pv, pm)
    with jlora.inject(adapters):
        factored = model.apply({"params": base}, *pv["batch"][:2])
    merged_params = jlora.merge(base, adapters)
    merged = model.apply({"params": merged_params}, *pv["batch"][:2])
    moved = _err(ref, _torch_logits(pv, pv["tm"]))
    errs = {"factored": _err(factored, ref), "merged": _err(merged, ref)}
    assert max(errs.values()) <= 1e-5 and moved > 1e-2, (errs, moved)

    # Gradients of d and b of a cross-entropy loss.
    ids, mask, labels = pv["batch"]
    pm.zero_grad()
    out = pm(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
    )
    out.loss.backward()
    trainable, frozen = jlora.split(adapters)

    def loss(t):
        with jlora.inject(jlora.combine(t, frozen)):
            logits = model.apply({"params": base}, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(trainable)
    assert abs(float(value) - out.loss.item()) <= 1e-6
    for p, layer in pv["layers"].items():
        for ours, theirs in (
            (grads[p].params["d"], layer.vera_lambda_d["default"].grad),
            (grads[p].params["b"], layer.vera_lambda_b["default"].grad),
        ):
            theirs = theirs.numpy()
            assert np.abs(theirs).max() > 1e-6, p
            assert _err(ours, theirs) <= 1e-5 * max(1.0, np.abs(theirs).max()), (
                p,
                _err(ours, theirs),
            )
    pm.zero_grad()

    # Merge: PEFT's get_delta_weight and merged weights, transposed.
    delta = jlora.delta(adapters)
    flat = jax.tree_util.tree_flatten_with_path(merged_params)[0]
    merged_flat = {"/".join(k.key for k in path): x for path, x in flat}
    for p, layer in pv["layers"].items():
        with torch.no_grad():
            dw = layer.get_delta_weight("default").numpy()
            w = layer.get_base_layer().weight.numpy()
        assert _err(delta[p], dw.T) <= 1e-6, p
        assert _err(merged_flat[p], (w + dw).T) <= 1e-6, p
    unloaded = copy.deepcopy(pm).merge_and_unload()
    assert _err(merged, _torch_logits(pv, unloaded)) <= 1e-5


@pytest.mark.slow
def test_to_peft_exports_rank_r_lora(tmp_path, peft_vera):
    pv = peft_vera
    model, base, peft = pv["model"], pv["base"], pv["peft"]
    ids, mask, _ = pv["batch"]
    apply = jax.jit(lambda p: model.apply({"params": p}, ids, mask))
    head = {k: pv["params"][k] for k in ("classifier", "pooler")}

    def peft_lora_logits(folder):
        lm = peft.PeftModel.from_pretrained(copy.deepcopy(pv["tm"]), str(folder)).eval()
        return _torch_logits(pv, lm)

    # PEFT's own pair: the exported LoRA gives the logits of PEFT's VeRA model.
    with_peft_pair = _with_peft_pair_and_vectors(pv, seed=2)
    folder = jpeft.to_peft(model, with_peft_pair, tmp_path / "peft_pair", extra_params=head)
    ref_vera = _torch_logits(pv, pv["pm"])
    assert _err(peft_lora_logits(folder), ref_vera) <= 1e-4

    # The regenerated pair (the default): logits of jlora's merged model.
    cfg = _cfg(targets=pv["acfg"].targets)
    _, regen = jlora.init(cfg, pv["params"], 0)
    trained = _set_vectors(regen, seed=3)
    folder = jpeft.to_peft(model, trained, tmp_path / "regen", extra_params=head)
    c = json.loads((folder / persist.CONFIG_FILE).read_text())
    assert c["r"] == R and c["lora_alpha"] == R and not c["rank_pattern"]  # rank r, scale 1
    assert c["use_rslora"] is False and len(c["target_modules"]) == 12
    ours = np.asarray(apply(jlora.merge(base, trained)))
    moved = _err(ours, np.asarray(apply(base)))
    err = _err(peft_lora_logits(folder), ours)
    assert err <= 1e-4 and moved > 1e-2, (err, moved)
