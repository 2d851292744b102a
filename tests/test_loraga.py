"""LoRA-GA: the gradient-SVD init, its options, exports, and parity with PEFT 0.21's `lora_ga`.

PEFT runs `torch.svd_lowrank`, a randomized SVD whose singular vectors come with random signs; the
exact parity tests replace it by jlora's own SVD (signs fixed as jlora fixes them), so both sides
split the very same components, and a separate test runs PEFT unpatched on a gradient of low rank
(where the randomized SVD is exact) and compares up to the sign of each component.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fake_grads, hf_twin

import jlora
import jlora.models as jm
from jlora import persist, targets
from jlora.errors import ConfigError
from jlora.interop import peft as jpeft
from jlora.methods.loraga import fix_signs

R, ALPHA = 2, 4.0


def _cfg(**kw):
    return jlora.AdapterConfig(**{"method": "loraga", "rank": R, "alpha": ALPHA, **kw})


def _perturb(adapters, seed=11, scale=0.05):
    rng, out = np.random.default_rng(seed), {}
    for p, a in adapters.items():
        leaves = {
            n: jnp.asarray(x + scale * rng.standard_normal(x.shape), x.dtype)
            for n, x in a.params.items()
        }
        out[p] = a.replace(params=leaves)
    return out


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _rel(a, b) -> float:
    return _err(a, b) / max(float(np.abs(np.asarray(b)).max()), 1e-30)


# --- without PyTorch ---------------------------------------------------------------------------


def test_options():
    o = _cfg().options
    assert (o.direction, o.scale, o.stable_gamma, o.niter) == ("ArB2r", "stable", 16.0, None)
    method = jlora.METHODS["loraga"]
    assert method.needs_grads and method.residual(o)
    for kw, match in [
        (dict(loraga_direction="ab"), r"loraga_direction='ab' is invalid: expected one of ArB2r"),
        (dict(loraga_scale="x"), r"loraga_scale='x' is invalid: expected one of stable"),
        (dict(loraga_stable_gamma=0), r"loraga_stable_gamma=0 is invalid: expected a number > 0"),
        (dict(loraga_niter=-1), r"loraga_niter=-1 is invalid"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**kw)


def test_needs_grads_and_rank_limit(stacked_params):
    with pytest.raises(ValueError, match="needs gradients"):
        jlora.init(
            _cfg(targets="proj/kernel"),
            stacked_params,
            0,
            layouts=jlora.stacked_layouts(stacked_params),
        )
    grads = fake_grads(stacked_params)
    with pytest.raises(ValueError, match=r"loraga rank 13 .* at most min\(d_in, d_out\) = 24"):
        jlora.init(
            _cfg(targets="proj/kernel", rank=13),
            stacked_params,
            0,
            grads=grads,
            layouts=jlora.stacked_layouts(stacked_params),
        )


@pytest.mark.parametrize(
    ("direction", "scale"),
    [
        ("ArB2r", "stable"),
        ("A2rBr", "weight_svd"),
        ("ArBr", "gd_scale"),
        ("random", "unit"),
        ("random", "weight_svd"),
    ],
)
def test_init_from_the_gradient_svd(stacked_params, direction, scale):
    """The factors are the chosen components of G's top-2r SVD, scaled; the output is exact."""
    grads = fake_grads(stacked_params)
    cfg = _cfg(
        targets="proj/kernel|layers/mlp/kernel", loraga_direction=direction, loraga_scale=scale
    )
    base, ad = jlora.init(
        cfg, stacked_params, 0, grads=grads, layouts=jlora.stacked_layouts(stacked_params)
    )
    flat, bflat = targets.flatten(stacked_params), targets.flatten(base)
    for p, a in ad.items():
        s = a.spec.scale
        assert s == ALPHA / R and a.spec.residual and a.spec.trainable == ("A", "B")
        Ks, Gs = np.asarray(flat[p]).reshape(-1, *flat[p].shape[-2:]), np.asarray(grads[p])
        Gs = Gs.reshape(Ks.shape)
        As = np.asarray(a.params["A"]).reshape(-1, a.spec.d_in, R)
        Bs = np.asarray(a.params["B"]).reshape(-1, R, a.spec.d_out)
        # Residual: base + s·A@B = K.
        np.testing.assert_allclose(
            np.asarray(bflat[p]).reshape(Ks.shape) + s * As @ Bs, Ks, atol=2e-5, rtol=0
        )
        for K, G, A, B in zip(Ks, Gs, As, Bs, strict=True):
            U, S, Vt = np.linalg.svd(G.astype(np.float64), full_matrices=False)
            sign = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])
            U, Vt = U * sign, Vt * sign[:, None]
            ia, ib = {
                "ArB2r": (np.arange(R), np.arange(R, 2 * R)),
                "A2rBr": (np.arange(R, 2 * R), np.arange(R)),
                "ArBr": (np.arange(1, 2 * R, 2), np.arange(0, 2 * R, 2)),
                "random": (None, None),
            }[direction]
            if direction == "random":  # the same r of the 2r components for both factors
                ia = ib = [int(np.argmax(np.abs(U[:, : 2 * R].T @ A[:, j]))) for j in range(R)]
                assert len(set(ia)) == R
            factor = {
                "stable": a.spec.d_out**0.25 / 4.0,
                "weight_svd": np.linalg.svd(K, compute_uv=False)[0] / S[ib[0]],
                "gd_scale": 1 / s,
                "unit": 1.0,
            }[scale]
            A_want = U[:, ia] / (s if scale == "gd_scale" else 1.0)
            np.testing.assert_allclose(A, A_want, atol=2e-5 / (s if scale == "gd_scale" else 1))
            np.testing.assert_allclose(
                B, factor * S[ib, None] * Vt[ib], rtol=0, atol=2e-5 * np.abs(B).max()
            )


def test_randomized_svd_option(stacked_params):
    """`loraga_niter=4` (PEFT's algorithm) equals the exact SVD on a gradient of rank ≤ 4r."""
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((24, 6)))[0]
    V = np.linalg.qr(rng.standard_normal((40, 6)))[0]
    G = (U * [1.0, 0.7, 0.5, 0.35, 0.2, 0.1]) @ V.T
    grads = {"proj/kernel": jnp.asarray(G, jnp.float32)}
    exact = jlora.init(
        _cfg(targets="proj/kernel"),
        stacked_params,
        0,
        grads=grads,
        layouts=jlora.stacked_layouts(stacked_params),
    )[1]
    rand = jlora.init(
        _cfg(targets="proj/kernel", loraga_niter=4),
        stacked_params,
        0,
        grads=grads,
        layouts=jlora.stacked_layouts(stacked_params),
    )
    for n in ("A", "B"):
        assert _rel(rand[1]["proj/kernel"].params[n], exact["proj/kernel"].params[n]) < 1e-5


def test_fix_signs():
    U = jnp.array([[0.1, -0.9], [-0.8, 0.2]])
    Vt = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    U2, Vt2 = fix_signs(U, Vt)
    np.testing.assert_allclose(U2, [[-0.1, 0.9], [0.8, -0.2]], rtol=1e-7)
    np.testing.assert_allclose(Vt2, [[-1.0, -2.0], [-3.0, -4.0]], rtol=1e-7)


def test_jlora_format_round_trip_and_fold(tmp_path, stacked_params):
    grads = fake_grads(stacked_params)
    cfg = _cfg(targets="proj/kernel")
    base, initial = jlora.init(
        cfg, stacked_params, 0, grads=grads, layouts=jlora.stacked_layouts(stacked_params)
    )
    trained = _perturb(initial)
    loaded, cfg2, _, _ = persist.load_adapters(persist.save_adapters(tmp_path, trained, cfg))
    assert cfg2 == cfg and loaded["proj/kernel"].spec == trained["proj/kernel"].spec
    A, B = jpeft.fold("proj/kernel", trained["proj/kernel"], initial["proj/kernel"])
    assert A.shape == (24, 2 * R) and B.shape == (2 * R, 40)
    s = trained["proj/kernel"].spec.scale
    want = jlora.merge(base, trained)["proj"]["kernel"]
    got = np.asarray(stacked_params["proj"]["kernel"], np.float64) + s * A @ B
    assert _err(got, want) < 1e-5


# --- parity with PEFT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_setup():
    """A tiny BERT classifier (no dropout: PEFT's pre-pass runs in train mode) in PyTorch and
    jlora, two labelled micro-batches, and the mean gradients of both pre-passes."""
    peft = pytest.importorskip("peft")
    torch, _, tm, model, params = hf_twin(
        "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    tgt = jm.preset(model, "all-linear")
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        ids = rs.randint(3, 100, (4, 7))
        mask = np.ones_like(ids)
        mask[1, 5:] = 0
        batches.append({"ids": ids, "mask": mask, "labels": rs.randint(0, 2, 4)})

    def loss(p, b):
        logits = model.apply({"params": p}, b["ids"], b["mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    grads = jlora.gradient_stats(loss, params, batches, _cfg(targets=tgt))
    names = {p: jpeft.hf_module(model, jpeft._linen_module(p)) for p in grads}
    lcfg = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=sorted(names.values()),
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(),
    )
    pre = copy.deepcopy(tm)

    def train_step():
        for b in batches:
            out = pre(
                input_ids=torch.tensor(b["ids"]),
                attention_mask=torch.tensor(b["mask"]),
                labels=torch.tensor(b["labels"]),
            )
            out.loss.backward()

    peft.preprocess_loraga(pre, lcfg, train_step)
    torch_grads = {m: pre.get_submodule(m)._peft_loraga_grad.clone() for m in names.values()}
    # The parity tests give both inits the same gradient: PEFT's, transposed.
    same = {p: jnp.asarray(torch_grads[m].numpy().T) for p, m in names.items()}
    ids = np.random.RandomState(1).randint(3, 100, (3, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return dict(
        torch=torch,
        peft=peft,
        tm=tm,
        model=model,
        params=params,
        targets=tgt,
        names=names,
        grads=grads,
        torch_grads=torch_grads,
        same_grads=same,
        batch=(ids, mask),
    )


def _jax_svd_lowrank(torch):
    """`torch.svd_lowrank` replaced by jlora's exact SVD of the transposed matrix, signs fixed
    as jlora fixes them: PEFT then sees the components jlora splits."""

    def svd_lowrank(A, q=6, niter=2, M=None):
        U, S, Vt = jnp.linalg.svd(jnp.asarray(A.detach().numpy().T), full_matrices=False)
        U, Vt = fix_signs(U, Vt)
        # Of the transposed matrix: torch's U (out side) is our Vᵀ, torch's V (in side) our U.
        t = lambda x: torch.tensor(np.asarray(x)[..., :q].copy())  # noqa: E731
        return t(Vt.T), t(S), t(U)

    return svd_lowrank


def _peft_loraga(ps, monkeypatch, grads=None, **ga):
    """PEFT's LoRA-GA model from the pre-pass gradients (or `grads` {module: (out, in)})."""
    torch, peft = ps["torch"], ps["peft"]
    tm = copy.deepcopy(ps["tm"])
    for m, g in (grads or ps["torch_grads"]).items():
        tm.get_submodule(m)._peft_loraga_grad = g.clone()
    cfg = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=sorted(ps["names"].values()),
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(**ga),
    )
    if monkeypatch is not None:
        monkeypatch.setattr(torch, "svd_lowrank", _jax_svd_lowrank(torch))
    pm = peft.get_peft_model(tm, cfg).eval()
    if monkeypatch is not None:
        monkeypatch.undo()
    layers = {p: pm.get_submodule(f"base_model.model.{m}") for p, m in ps["names"].items()}
    return pm, layers


def _peft_factors(layer):
    A = layer.lora_A["default"].weight.detach().numpy().T
    B = layer.lora_B["default"].weight.detach().numpy().T
    W = layer.get_base_layer().weight.detach().numpy().T
    return A, B, W


@pytest.mark.slow
def test_peft_prepass_gradient_is_the_mean_gradient(peft_setup):
    ps = peft_setup
    for p, m in ps["names"].items():
        theirs = ps["torch_grads"][m].numpy().T
        assert _rel(ps["grads"][p], theirs) < 1e-5, p


@pytest.mark.slow
@pytest.mark.parametrize(
    "ga",
    [
        dict(),
        dict(direction="A2rBr", scale="weight_svd"),
        dict(direction="ArBr", scale="gd_scale"),
        dict(scale="unit"),
        dict(scale="stable", stable_gamma=4),
    ],
)
def test_peft_init_parity(peft_setup, monkeypatch, ga):
    ps = peft_setup
    _, layers = _peft_loraga(ps, monkeypatch, **ga)
    cfg = _cfg(targets=ps["targets"], **{f"loraga_{k}": v for k, v in ga.items()})
    base, ad = jlora.init(cfg, ps["params"], 0, grads=ps["same_grads"])
    flat = targets.flatten(base)
    for p, layer in layers.items():
        A, B, W = _peft_factors(layer)
        errs = (_rel(ad[p].params["A"], A), _rel(ad[p].params["B"], B), _rel(flat[p], W))
        assert max(errs) <= 1e-5, (p, errs)


@pytest.mark.slow
def test_peft_unpatched_svd_lowrank_up_to_signs(peft_setup):
    """PEFT's own randomized SVD on a gradient of rank 6 ≤ q = 4r (so it is exact): the same
    factors up to the sign of each component, and the same output at init."""
    ps = peft_setup
    rng = np.random.default_rng(0)
    grads, torch_grads = {}, {}
    for p, m in ps["names"].items():
        d_in, d_out = targets.flatten(ps["params"])[p].shape
        U = np.linalg.qr(rng.standard_normal((d_in, 6)))[0]
        V = np.linalg.qr(rng.standard_normal((d_out, 6)))[0]
        G = ((U * [1.0, 0.7, 0.5, 0.35, 0.2, 0.1]) @ V.T).astype(np.float32)
        grads[p], torch_grads[m] = jnp.asarray(G), ps["torch"].tensor(G.T.copy())
    ps["torch"].manual_seed(0)
    pm, layers = _peft_loraga(ps, None, grads=torch_grads)
    base, ad = jlora.init(_cfg(targets=ps["targets"]), ps["params"], 0, grads=grads)
    for p, layer in layers.items():
        A, B, _ = _peft_factors(layer)
        ours_A, ours_B = np.asarray(ad[p].params["A"]), np.asarray(ad[p].params["B"])
        sa = np.sign(np.sum(A * ours_A, axis=0))
        sb = np.sign(np.sum(B * ours_B, axis=1))
        assert _rel(A * sa, ours_A) < 1e-5 and _rel(B * sb[:, None], ours_B) < 1e-5, p
    ids, mask = ps["batch"]
    with ps["torch"].no_grad():
        ref = pm(input_ids=ps["torch"].tensor(ids), attention_mask=ps["torch"].tensor(mask)).logits
    with jlora.inject(ad):
        ours = ps["model"].apply({"params": base}, ids, mask)
    assert _err(ours, ref.numpy()) <= 1e-5


@pytest.mark.slow
def test_peft_forward_merge_and_export(tmp_path, peft_setup, monkeypatch):
    ps = peft_setup
    torch, peft, model = ps["torch"], ps["peft"], ps["model"]
    pm, layers = _peft_loraga(ps, monkeypatch)
    base, initial = jlora.init(_cfg(targets=ps["targets"]), ps["params"], 0, grads=ps["same_grads"])
    trained = _perturb(initial)  # the same trained factors on both sides
    for p, layer in layers.items():
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(trained[p].params["A"]).T))
            layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(trained[p].params["B"]).T))
    ids, mask = ps["batch"]

    def logits(module):
        with torch.no_grad():
            out = module(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        return out.logits.numpy()

    apply = jax.jit(lambda p: model.apply({"params": p}, ids, mask))
    ref = logits(pm)
    with jlora.inject(trained):
        factored = model.apply({"params": base}, ids, mask)
    merged_params = jlora.merge(base, trained)
    merged = np.asarray(apply(merged_params))
    original = np.asarray(apply(ps["params"]))
    errs = {"factored": _err(factored, ref), "merged": _err(merged, ref)}
    assert max(errs.values()) <= 1e-5 and _err(merged, original) > 1e-2, errs
    # Merge: PEFT's merged weights are W_res + s·B@A, ours K_res + s·A@B.
    unloaded = copy.deepcopy(pm).merge_and_unload()
    flat = targets.flatten(merged_params)
    for p, m in ps["names"].items():
        w = unloaded.get_submodule(m).weight.detach().numpy().T
        assert _rel(flat[p], w) <= 1e-5, p
    assert _err(merged, logits(unloaded)) <= 1e-5

    # PEFT export: rank 2r on the ORIGINAL base.
    head = {k: ps["params"][k] for k in ("classifier", "pooler")}
    folder = jpeft.to_peft(model, trained, tmp_path, initial_adapters=initial, extra_params=head)
    c = json.loads((folder / persist.CONFIG_FILE).read_text())
    assert c["r"] == 2 * R and c["lora_alpha"] == 2 * R * ALPHA / R
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(ps["tm"]), str(folder)).eval()
    assert _err(logits(loaded), merged) <= 1e-4
    with pytest.raises(ValueError, match="initial_adapters lacks"):
        jpeft.to_peft(model, trained, tmp_path / "x")
