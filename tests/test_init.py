"""Inits: exact properties of every method on random weights (fp32, CPU)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EXACT_AT_INIT, VARIANTS, fake_grads, init_variant, make_config, rel_err

import jlora
from jlora import targets


@pytest.mark.parametrize("variant", EXACT_AT_INIT)
def test_output_unchanged_at_init(variant, tiny):
    model, params, ids = tiny
    base, adapters = init_variant(variant, params)
    ref = model.apply({"params": params}, ids)
    merged = model.apply({"params": jlora.merge(base, adapters)}, ids)
    assert rel_err(merged, ref) <= 1e-5
    with jlora.inject(adapters):
        factored = model.apply({"params": base}, ids)
    assert rel_err(factored, ref) <= 1e-5


@pytest.mark.parametrize("variant", EXACT_AT_INIT)
def test_stacked_kernels_unchanged_at_init(variant, stacked_params):
    base, adapters = init_variant(variant, stacked_params, targets=".*kernel")
    merged = jlora.merge(base, adapters)
    for path in adapters:
        got = targets.flatten(merged)[path]
        want = targets.flatten(stacked_params)[path]
        assert rel_err(got, want) <= 1e-5, path


@pytest.mark.parametrize("method", ["nlora", "inttune"])
def test_nlora_default_is_the_paper_code(method, stacked_params):
    base, adapters = init_variant(method, stacked_params, targets=".*kernel", alpha=12.0)
    assert base is stacked_params  # no residual: the frozen weights are untouched
    s = 12.0 / 4
    deltas = jlora.delta(adapters)
    for path, a in adapters.items():
        K = np.asarray(targets.flatten(stacked_params)[path], np.float64)
        want = s * K[..., :, :4] @ K[..., :4, :4] @ K[..., :4, :]
        np.testing.assert_allclose(deltas[path], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(a.params["A"], K[..., :, :4].astype(np.float32))
        np.testing.assert_array_equal(a.params["M"], K[..., :4, :4].astype(np.float32))
        np.testing.assert_array_equal(a.params["B"], K[..., :4, :].astype(np.float32))


def test_pissa_factors_are_the_top_singular_triplets(stacked_params):
    base, adapters = init_variant("pissa", stacked_params, targets=".*kernel")
    for path, a in adapters.items():
        K = np.asarray(targets.flatten(stacked_params)[path], np.float64)
        s = a.spec.scale
        U, S, Vt = np.linalg.svd(K, full_matrices=False)
        top = (U[..., :4] * S[..., None, :4]) @ Vt[..., :4, :]
        np.testing.assert_allclose(s * a.params["A"] @ a.params["B"], top, atol=2e-4)
        np.testing.assert_allclose(targets.flatten(base)[path], K - top, atol=2e-4)


def test_randomized_pissa_is_close_to_full(stacked_params):
    _, full = init_variant("pissa", stacked_params)
    _, rand = init_variant("pissa_rand", stacked_params)
    for p in full:
        assert rel_err(jlora.delta(rand)[p], jlora.delta(full)[p]) < 0.05


def test_nlora_pinv_is_textbook_nystrom(stacked_params):
    _, adapters = init_variant("nlora_pinv", stacked_params, targets="proj/kernel")
    K = np.asarray(stacked_params["proj"]["kernel"], np.float64)
    nystrom = K[:, :4] @ np.linalg.pinv(K[:4, :4]) @ K[:4, :]
    np.testing.assert_allclose(jlora.delta(adapters)["proj/kernel"], nystrom, rtol=1e-3, atol=1e-3)


def test_nlora_random_sketch_reconstructs_low_rank_kernels():
    k1, k2 = jax.random.split(jax.random.key(0))
    K = jax.random.normal(k1, (64, 4)) @ jax.random.normal(k2, (4, 48))  # rank 4
    cfg = make_config("nlora_random", rank=4, targets=".*")
    base, adapters = jlora.init(cfg, {"w": {"kernel": K}}, jax.random.key(1))
    assert rel_err(jlora.delta(adapters)["w/kernel"], K) < 1e-3  # Nyström is exact at rank r
    assert float(jnp.linalg.norm(base["w"]["kernel"])) < 1e-3 * float(jnp.linalg.norm(K))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_seed_bit_identical(variant, stacked_params):
    _, a1 = init_variant(variant, stacked_params, key=5)
    _, a2 = init_variant(variant, stacked_params, key=5)
    assert jax.tree.structure(a1) == jax.tree.structure(a2)
    for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2), strict=True):
        np.testing.assert_array_equal(x, y)
    # config.seed is the default key
    cfg = make_config(variant, seed=5)
    grads = fake_grads(stacked_params) if cfg.method == "gora" else None
    _, a3 = jlora.init(
        cfg, stacked_params, grads=grads, layouts=jlora.stacked_layouts(stacked_params)
    )
    _, a4 = jlora.init(
        cfg,
        stacked_params,
        jax.random.key(5),
        grads=grads,
        layouts=jlora.stacked_layouts(stacked_params),
    )
    for x, y in zip(jax.tree.leaves(a3), jax.tree.leaves(a4), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("variant", ["lora", "slora", "nola"])
def test_different_targets_get_different_randoms(variant, tiny):
    _, params, _ = tiny
    _, ad = init_variant(variant, params, targets=r".*/(query|key)/kernel")
    q, k = ad["block_0/query/kernel"], ad["block_0/key/kernel"]
    if variant == "nola":
        assert q.spec.seed != k.spec.seed
    else:
        assert not np.array_equal(q.params["A"], k.params["A"])


def test_nola_regenerated_bases_equal_cached(stacked_params):
    _, regen = init_variant("nola", stacked_params, key=3)
    _, cache = init_variant("nola_cache", stacked_params, key=3)
    for path in regen:
        assert set(regen[path].params) == {"alpha", "beta"}
        assert regen[path].spec.seed == cache[path].spec.seed
        bases = jax.jit(jlora.methods.nola.bases, static_argnums=0)(regen[path].spec)
        for name, value in bases.items():
            np.testing.assert_array_equal(value, cache[path].params[name])
    # with trained coefficients the two give the same ΔK
    rng = np.random.default_rng(0)
    trained = {
        p: a.replace(
            params={
                **a.params,
                "alpha": rng.normal(size=a.params["alpha"].shape),
                "beta": rng.normal(size=a.params["beta"].shape),
            }
        )
        for p, a in regen.items()
    }
    cached = {
        p: cache[p].replace(
            params={**cache[p].params, **{n: trained[p].params[n] for n in ("alpha", "beta")}}
        )
        for p in cache
    }
    for p in regen:
        np.testing.assert_allclose(jlora.delta(trained)[p], jlora.delta(cached)[p], rtol=1e-5)
        assert float(jnp.abs(jlora.delta(trained)[p]).max()) > 0


def test_stacked_init_matches_per_matrix_structure(stacked_params):
    _, adapters = init_variant("slora", stacked_params, targets="layers/.*")
    a = adapters["layers/mlp/kernel"]
    assert a.params["A"].shape == (3, 40, 4)
    assert a.params["M"].shape == (3, 4, 4)
    assert a.params["B"].shape == (3, 4, 24)
    # layers draw independent randoms
    assert not np.array_equal(a.params["A"][0], a.params["A"][1])


def test_gora_ranks_budget_and_b_init(tiny):
    _, params, _ = tiny
    cfg = make_config("gora", rank=4, gora_rank_range=(1, 32), gora_gamma=0.05, alpha=8.0)
    grads = fake_grads(params)
    _, adapters = jlora.init(cfg, params, jax.random.key(0), grads=grads)
    rows = jlora.summary(adapters)
    ranks = [r["rank"] for r in rows]
    assert all(1 <= r <= 32 for r in ranks) and len(set(ranks)) > 1
    budget = sum(r["budget"] for r in rows)
    assert budget == sum(4 * sum(r["shape"]) for r in rows)
    # The official rounding floors each target's share: at most one rank per target below it.
    features = sum(sum(r["shape"]) for r in rows)
    assert budget - features <= jlora.trainable_count(adapters) <= budget
    # s·A@B = −γ·√(d_in/r)·(G projected on A's column space)
    for path, a in adapters.items():
        A = np.asarray(a.params["A"], np.float64)
        G = np.asarray(grads[path], np.float64)
        r = a.spec.rank
        assert a.params["A"].shape[-1] == r and math.isclose(a.spec.scale, 8.0 / math.sqrt(r))
        P = A @ np.linalg.solve(A.T @ A, A.T @ G)
        want = -0.05 * math.sqrt(A.shape[0] / r) * P
        np.testing.assert_allclose(jlora.delta(adapters)[path], want, rtol=1e-3, atol=1e-6)


def test_gora_ranks_follow_importance():
    k = jax.random.split(jax.random.key(0), 2)
    params = {n: {"kernel": jax.random.normal(kk, (32, 32))} for n, kk in zip("ab", k, strict=True)}
    grads = {"a/kernel": jnp.ones((32, 32)) * 10.0, "b/kernel": jnp.ones((32, 32)) * 0.1}
    cfg = make_config("gora", rank=8, gora_rank_range=(1, 32))
    _, ad = jlora.init(cfg, params, jax.random.key(0), grads=grads)
    assert ad["a/kernel"].spec.rank > 8 > ad["b/kernel"].spec.rank


def test_gora_stacked_ranks_are_padded(stacked_params):
    grads = fake_grads(stacked_params)
    grads["layers/mlp/kernel"] = (
        grads["layers/mlp/kernel"] * jnp.array([5.0, 1.0, 0.1])[:, None, None]
    )
    cfg = make_config("gora", rank=4, gora_rank_range=(1, 16), targets=".*kernel")
    _, ad = jlora.init(
        cfg,
        stacked_params,
        jax.random.key(0),
        grads=grads,
        layouts=jlora.stacked_layouts(stacked_params),
    )
    a = ad["layers/mlp/kernel"]
    ranks = a.spec.get("ranks")
    assert len(set(ranks)) == 3 and a.spec.rank == max(ranks)
    for layer, r in enumerate(ranks):
        assert np.all(np.asarray(a.params["A"][layer, :, r:]) == 0)
        assert np.all(np.asarray(a.params["B"][layer, r:, :]) == 0)
        assert np.all(np.abs(np.asarray(a.params["A"][layer, :, :r])) > 0)
    scales = np.asarray(a.spec.scale)
    np.testing.assert_allclose(scales, 16.0 / np.sqrt(ranks), rtol=1e-6)


def test_gora_requires_grads(stacked_params):
    with pytest.raises(ValueError, match="grads"):
        jlora.init(
            make_config("gora"),
            stacked_params,
            jax.random.key(0),
            layouts=jlora.stacked_layouts(stacked_params),
        )
    with pytest.raises(ValueError, match=r"only used by methods \['gora'"):
        jlora.init(
            make_config("lora"),
            stacked_params,
            grads=fake_grads(stacked_params),
            layouts=jlora.stacked_layouts(stacked_params),
        )


def test_bf16_kernels_keep_their_dtype(stacked_params):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), stacked_params)
    base, adapters = init_variant("pissa", params)
    assert targets.flatten(base)["proj/kernel"].dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(adapters))
    merged = jlora.merge(base, adapters)
    assert targets.flatten(merged)["proj/kernel"].dtype == jnp.bfloat16


def _official_ranks(importances, features, ref_rank, rank_range):
    """The official `get_allocated_rank` ("moderate"), transcribed: importances normalised in
    float32 (a torch.tensor of Python floats), `round(T·a)` then `//` the features, clipped."""
    imp = np.asarray(importances, np.float32)
    a = imp / imp.sum(dtype=np.float32)
    T = sum(f * ref_rank for f in features)
    out = []
    for share, f in zip(a, features, strict=True):
        rank = round(T * float(share)) // f
        out.append(min(max(round(rank), rank_range[0]), rank_range[1]))
    return out


@pytest.mark.parametrize(
    ("importances", "dims", "ref", "rng", "want"),
    [
        # The case: two 64×64 targets; T = 2048; round(1228.8) // 128 = 9, 819 // 128 = 6.
        ([0.6, 0.4], [(64, 64), (64, 64)], 8, (4, 32), [9, 6]),
        # Floor, not round: 0.7 · 2048 = 1433.6 → 1434 // 128 = 11 (rounding 11.2 also gives 11),
        # 0.3 · 2048 = 614.4 → 614 // 128 = 4 (614.4 / 128 = 4.8 would round to 5).
        ([0.7, 0.3], [(64, 64), (64, 64)], 8, (4, 32), [11, 4]),
        # Clipping at both ends: T = 4096; 3891.2 → 3891 // 256 = 15 → 12; 204.8 → 205 // 256 = 0
        # → 4.
        ([0.95, 0.05], [(128, 128), (128, 128)], 8, (4, 12), [12, 4]),
        # Different shapes: T = 8·(96 + 160) = 2048; 0.5 → 1024 // 96 = 10, 1024 // 160 = 6.
        ([0.5, 0.5], [(32, 64), (64, 96)], 8, (1, 32), [10, 6]),
    ],
)
def test_gora_allocation_matches_the_official_rounding(importances, dims, ref, rng, want):
    from jlora.methods import gora

    imp = {f"t{i}": np.float32(v) for i, v in enumerate(importances)}
    d = {f"t{i}": dd for i, dd in enumerate(dims)}
    ranks, _ = gora.allocate_ranks(imp, d, {p: ref for p in imp}, rng)
    assert [int(ranks[f"t{i}"]) for i in range(len(dims))] == want
    assert want == _official_ranks(importances, [sum(x) for x in dims], ref, rng)


def test_gora_allocation_matches_the_official_code_on_random_patterns():
    """60 random importance patterns over mixed shapes and a stacked kernel (each matrix of a
    stack is one entry of the official list)."""
    from jlora.methods import gora

    rng = np.random.default_rng(0)
    dims = {"q": (64, 64), "up": (64, 176), "stack": (48, 32)}
    for _ in range(60):
        imp = {"q": rng.random(), "up": rng.random(), "stack": rng.random(3)}
        ranks, _ = gora.allocate_ranks(imp, dims, {p: 8 for p in dims}, (2, 40))
        flat_imp = [imp["q"], imp["up"], *imp["stack"]]
        feats = [128, 240, 80, 80, 80]
        want = _official_ranks(flat_imp, feats, 8, (2, 40))
        want = [min(r, m) for r, m in zip(want, [64, 64, 32, 32, 32], strict=True)]
        got = [int(ranks["q"]), int(ranks["up"]), *map(int, ranks["stack"])]
        assert got == want, (imp, got, want)


def test_pissa_oversample_zero_matches_peft_randomized_svd():
    """`pissa_oversample=0` runs PEFT's `pissa_niter_k` algorithm (`torch.svd_lowrank(W, q=r,
    niter=k)`): over 30 seeds its error against the best rank-r approximation equals PEFT's
    within sampling noise; the default oversampling (8) is more accurate than both."""
    torch = pytest.importorskip("torch")
    from jlora import linalg

    rng = np.random.default_rng(0)
    d_in, d_out, r, niter, n = 256, 192, 8, 1, 30
    U, _ = np.linalg.qr(rng.standard_normal((d_in, d_out)))
    V, _ = np.linalg.qr(rng.standard_normal((d_out, d_out)))
    s = 1.0 / np.sqrt(1.0 + np.arange(d_out))
    K = (U * s) @ V.T
    best = np.linalg.norm(s[r:])

    def error(U, S, Vt):
        return np.linalg.norm(K - (np.asarray(U) * np.asarray(S)) @ np.asarray(Vt)) / best

    K32 = jnp.asarray(K, jnp.float32)
    ours = {
        ov: [error(*linalg.randomized_svd(K32, r, niter, jax.random.key(i), ov)) for i in range(n)]
        for ov in (0, 8)
    }
    peft = []
    W = torch.tensor(K.T, dtype=torch.float32)  # PyTorch layout (d_out, d_in)
    for i in range(n):
        torch.manual_seed(i)
        Vr, S, Uh = torch.svd_lowrank(W, q=r, niter=niter)  # what PEFT's pissa_niter_k calls
        peft.append(error(Uh.numpy(), S.numpy(), Vr.numpy().T))
    noise = 3 * np.sqrt((np.var(ours[0]) + np.var(peft)) / n)
    assert abs(np.mean(ours[0]) - np.mean(peft)) <= noise, (np.mean(ours[0]), np.mean(peft))
    assert np.mean(ours[8]) < min(np.mean(ours[0]), np.mean(peft)) - noise
