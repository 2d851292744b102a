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
    _, a3 = jlora.init(cfg, stacked_params, grads=grads)
    _, a4 = jlora.init(cfg, stacked_params, jax.random.key(5), grads=grads)
    for x, y in zip(jax.tree.leaves(a3), jax.tree.leaves(a4), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("variant", ["lora", "slora", "nola"])
def test_different_targets_get_different_randoms(variant, tiny):
    _, params, _ = tiny
    _, ad = init_variant(variant, params, targets=r".*/(query|key)/kernel")
    q, k = ad["block_0/query/kernel"], ad["block_0/key/kernel"]
    if variant == "nola":
        assert q.spec.nola_seed != k.spec.nola_seed
    else:
        assert not np.array_equal(q.params["A"], k.params["A"])


def test_nola_regenerated_bases_equal_cached(stacked_params):
    _, regen = init_variant("nola", stacked_params, key=3)
    _, cache = init_variant("nola_cache", stacked_params, key=3)
    for path in regen:
        assert set(regen[path].params) == {"alpha", "beta"}
        assert regen[path].spec.nola_seed == cache[path].spec.nola_seed
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
    assert abs(jlora.trainable_count(adapters) - budget) <= 0.1 * budget
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
    _, ad = jlora.init(cfg, stacked_params, jax.random.key(0), grads=grads)
    a = ad["layers/mlp/kernel"]
    ranks = a.spec.ranks
    assert len(set(ranks)) == 3 and a.spec.rank == max(ranks)
    for layer, r in enumerate(ranks):
        assert np.all(np.asarray(a.params["A"][layer, :, r:]) == 0)
        assert np.all(np.asarray(a.params["B"][layer, r:, :]) == 0)
        assert np.all(np.abs(np.asarray(a.params["A"][layer, :, :r])) > 0)
    scales = np.asarray(a.spec.scale)
    np.testing.assert_allclose(scales, 16.0 / np.sqrt(ranks), rtol=1e-6)


def test_gora_requires_grads(stacked_params):
    with pytest.raises(ValueError, match="grads"):
        jlora.init(make_config("gora"), stacked_params, jax.random.key(0))
    with pytest.raises(ValueError, match="only used by method 'gora'"):
        jlora.init(make_config("lora"), stacked_params, grads=fake_grads(stacked_params))


def test_bf16_kernels_keep_their_dtype(stacked_params):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), stacked_params)
    base, adapters = init_variant("pissa", params)
    assert targets.flatten(base)["proj/kernel"].dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(adapters))
    merged = jlora.merge(base, adapters)
    assert targets.flatten(merged)["proj/kernel"].dtype == jnp.bfloat16
