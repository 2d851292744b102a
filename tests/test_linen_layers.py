"""Linen models jlora did not write: scanned layers, multi-axis DenseGeneral and Einsum kernels
on the factored path, for every method, against the merged path."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import thirdparty as tp
from conftest import VARIANTS, fake_grads, make_config, rel_err

import jlora
from jlora import targets

# Every method (the variants of conftest plus dora, vera and loraga).
ALL = {
    **VARIANTS,
    "dora": dict(method="dora"),
    "vera": dict(method="vera"),
    "loraga": dict(method="loraga"),
}
IDS = (np.arange(12).reshape(2, 6) * 7 + 3) % tp.VOCAB
GRAD_METHODS = ("gora", "loraga")


def _init(variant: str, params, layouts, **overrides):
    kw = {**ALL[variant], "rank": 2, **overrides}
    cfg = jlora.AdapterConfig(**kw)
    grads = fake_grads(params) if cfg.method in GRAD_METHODS else None
    return jlora.init(cfg, params, jax.random.key(1), grads=grads, layouts=layouts)


def assert_same_gradients(got, want, tol: float = 1e-4) -> None:
    """Every leaf's gradient equal to `tol` relative. The two paths round differently: in fp32
    through three attention layers their gradients differ by up to ~5e-5 relative (LoRA-GA's
    large initial factors), in float64 by < 1e-6 (`test_..._in_float64`)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) <= tol


def fp32_tol(variant: str) -> float:
    """Gradient tolerance in fp32: the residual inits (pinv / random-sampling NLoRA) and LoRA-GA
    cancel large numbers in the merged kernel, the others do not."""
    return 1e-3 if variant in ("nlora_pinv", "nlora_random", "loraga") else 3e-4


def _perturb(adapters, scale=0.1):
    """Trained-like adapters: every trainable leaf moved off its init (ΔK ≠ 0)."""
    out = {}
    for i, (p, a) in enumerate(adapters.items()):
        leaves = dict(a.params)
        for j, n in enumerate(a.spec.trainable):
            key = jax.random.key(100 * i + j)
            leaves[n] = leaves[n] + scale * jax.random.normal(key, leaves[n].shape)
        out[p] = a.replace(params=leaves)
    return out


@functools.cache
def _decoder(scan: bool):
    model = tp.ScannedDecoder(scan=scan)
    params = model.init(jax.random.key(0), IDS)["params"]
    return model, params, jlora.linen.layouts(model, IDS)


def cases(
    fast: tuple[str, ...],
    unrolled: tuple[str, ...] = ("lora",),
    scans: tuple[bool, ...] = (True, False),
) -> list:
    """(variant, scan) pairs: `fast` variants on scanned layers and `unrolled` ones on unrolled
    layers run in `make test`, the rest are slow."""
    return [
        pytest.param(
            v,
            scan,
            marks=() if v in (fast if scan else unrolled) else pytest.mark.slow,
            id=f"{'scanned' if scan else 'unrolled'}-{v}",
        )
        for scan in scans
        for v in ALL
    ]


def test_layouts_come_from_the_modules_not_the_number_of_axes():
    model = tp.ScannedDecoder()
    lay = jlora.linen.layouts(model, IDS)
    # (layers, heads, d_model, head_dim): stacked layers, then Gemma's einsum kernel order.
    assert lay["layers/q_einsum/kernel"] == jlora.KernelLayout((0,), (2,), (1, 3))
    assert lay["layers/key/kernel"] == jlora.KernelLayout((0,), (1,), (2, 3))
    assert lay["layers/out/kernel"] == jlora.KernelLayout((0,), (1, 2), (3,))
    assert lay["layers/wi/kernel"] == jlora.KernelLayout((0,), (1,), (2,))
    # The same kernel shape without a scan: one DenseGeneral((4, 8)) matrix, 32 -> 32.
    dg = nn.DenseGeneral((4, 8))
    params = dg.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    assert params["kernel"].shape == (32, 4, 8)
    assert jlora.linen.layouts(dg, jnp.ones((1, 32))) == {
        "kernel": jlora.KernelLayout((), (0,), (1, 2))
    }


def test_a_kernel_with_more_than_two_axes_needs_its_layout():
    dg = nn.DenseGeneral((4, 8))
    params = dg.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    cfg = jlora.AdapterConfig(method="lora", rank=2)
    with pytest.raises(ValueError, match=r"'kernel' has shape \(32, 4, 8\).*layouts="):
        jlora.init(cfg, params)


def test_multi_axis_update_is_one_rank_r_update_of_the_flattened_matrix():
    dg = nn.DenseGeneral((4, 8))
    x = jax.random.normal(jax.random.key(2), (3, 32))
    params = dg.init(jax.random.key(0), x)["params"]
    lay = jlora.linen.layouts(dg, x)
    for method in ("lora", "nlora", "pissa"):
        cfg = jlora.AdapterConfig(method=method, rank=3)
        base, ad = jlora.init(cfg, params, 0, layouts=lay)
        ad = _perturb(ad)
        assert ad["kernel"].spec.matrix_shape == (32, 32)
        dk = jlora.delta(ad)["kernel"]
        assert dk.shape == (32, 4, 8)
        assert np.linalg.matrix_rank(np.asarray(dk).reshape(32, 32), tol=1e-5) == 3
        merged = jlora.merge(base, ad)
        want = dg.apply({"params": merged}, x)
        with jlora.inject(ad):
            got = dg.apply({"params": base}, x)
        assert rel_err(got, want) <= 1e-5


# `make test` keeps GoRA (per-layer ranks and scales) and DoRA (a norm over the kernel) on the
# scanned Linen decoder; NOLA's per-layer bases run fast in tests/test_nnx.py, LoRA's in the
# dropout test of tests/test_scan_layers.py; everything else is slow. On unrolled layers the
# float64 test below checks every variant (more strictly), so fp32 runs on scanned layers only.
FAST = ("gora", "dora")
# Slow, on scanned layers: NOLA (per-layer bases), VeRA (frozen matrices shared by the stacked
# layers) and LoRA-GA (large initial factors). The other variants' factored code is the same
# per-layer code these run; their scanned cases (about 25 s of CI time each) were dropped to fit
# CI's time limit, and each still runs on unrolled layers in float64 below and on scanned NNX
# layers in tests/test_nnx.py.
SCANNED_SLOW = ("nola", "vera", "loraga")


@pytest.mark.parametrize(
    ("variant", "scan"),
    [c for c in cases(FAST, unrolled=(), scans=(True,)) if c.values[0] in FAST + SCANNED_SLOW],
)
def test_factored_path_matches_merged_outputs_and_gradients(variant, scan):
    model, params, layouts = _decoder(scan)
    base, adapters = _init(
        variant, params, layouts, targets=".*(q_einsum|key|value|out|wi|wo)/kernel"
    )
    adapters = _perturb(adapters)
    trainable, frozen = jlora.split(adapters)

    def merged_loss(t):
        merged = jlora.merge(base, jlora.combine(t, frozen))
        return jnp.mean(model.apply({"params": merged}, IDS) ** 2)

    def factored_loss(t):
        out = jlora.linen.apply(model, {"params": base}, jlora.combine(t, frozen), IDS)
        return jnp.mean(out**2)

    lm, gm = jax.value_and_grad(merged_loss)(trainable)
    lf, gf = jax.value_and_grad(factored_loss)(trainable)
    assert rel_err(lf, lm) <= 1e-5
    assert_same_gradients(gf, gm, tol=fp32_tol(variant))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(ALL))
def test_factored_gradients_equal_merged_in_float64(variant):
    """The same comparison in float64 (the merged path still merges in fp32, as jlora.merge
    does: ~1e-7 of rounding), so that rounding cannot hide a wrong gradient."""
    with jax.enable_x64(True):
        model = tp.ScannedDecoder(scan=False)
        params = model.init(jax.random.key(0), IDS)["params"]
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        base, ad = _init(variant, params, jlora.linen.layouts(model, IDS))
        trainable, frozen = jlora.split(jax.tree.map(lambda x: x.astype(jnp.float64), _perturb(ad)))

        def loss(t, factored):
            ad = jlora.combine(t, frozen)
            if factored:
                out = jlora.linen.apply(model, {"params": base}, ad, IDS)
            else:
                out = model.apply({"params": jlora.merge(base, ad)}, IDS)
            return jnp.mean(out**2)

        g_f = jax.grad(loss)(trainable, True)
        g_m = jax.grad(loss)(trainable, False)
    assert_same_gradients(g_f, g_m, tol=1e-6)


def test_scanned_layers_need_the_adapters_in_their_parameters():
    model = tp.ScannedDecoder()
    params = model.init(jax.random.key(0), IDS)["params"]
    base, ad = _init("lora", params, jlora.linen.layouts(model, IDS), targets=".*wi/kernel")
    assert ad["layers/wi/kernel"].spec.stack == (tp.LAYERS,)
    with pytest.raises(ValueError, match=r"layers/wi/kernel.*jlora.linen.attach"), jlora.inject(ad):
        model.apply({"params": base}, IDS)


def test_gora_per_layer_ranks_inside_the_scan():
    model = tp.ScannedDecoder()
    params = model.init(jax.random.key(0), IDS)["params"]
    base, ad = _init(
        "gora",
        params,
        jlora.linen.layouts(model, IDS),
        targets=".*wi/kernel",
        gora_rank_range=(1, 8),
    )
    ranks = np.asarray(ad["layers/wi/kernel"].spec.get("ranks"))
    assert ranks.shape == (tp.LAYERS,) and len(set(ranks.tolist())) > 1  # ranks differ per layer
    ad = _perturb(ad)
    want = model.apply({"params": jlora.merge(base, ad)}, IDS)
    got = jlora.linen.apply(model, {"params": base}, ad, IDS)
    assert rel_err(got, want) <= 1e-5


class _RawKernel(nn.Module):
    """A layer reading its own kernel: the factored path cannot run it."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))


def test_a_targeted_layer_the_factored_path_cannot_run_is_named():
    model = nn.Sequential([nn.Dense(8), _RawKernel()])
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    base, ad = jlora.init(jlora.AdapterConfig(method="lora", rank=2), params)
    with pytest.raises(ValueError, match=r"layers_1/kernel.*_RawKernel"), jlora.inject(ad):
        model.apply({"params": base}, x)


@pytest.mark.parametrize(
    "variant",
    ["lora", "gora", *(pytest.param(v, marks=pytest.mark.slow) for v in ("nola", "dora"))],
)
def test_batched_kernels_run_one_adapter_per_index(variant):
    """MoE experts: a kernel label in input, kernel and output (`Einsum("ECD,EDF->ECF")`,
    `DenseGeneral(batch_dims=...)`) is a stacked axis, one adapter per expert."""
    x = jax.random.normal(jax.random.key(3), (3, 5, 8))
    for layer in (nn.Einsum((3, 8, 4), "ECD,EDF->ECF"), nn.DenseGeneral(4, batch_dims=(0,))):
        params = layer.init(jax.random.key(0), x)["params"]
        lay = jlora.linen.layouts(layer, x)
        assert lay["kernel"] == jlora.KernelLayout((0,), (1,), (2,))  # per-expert matrices
        extra = {"gora_rank_range": (1, 4)} if variant == "gora" else {}
        base, ad = _init(variant, params, lay, **extra)
        ad = _perturb(ad)
        want = layer.apply({"params": jlora.merge(base, ad)}, x)
        with jlora.inject(ad):
            got = layer.apply({"params": base}, x)
        assert rel_err(got, want) <= 1e-5, type(layer).__name__


def test_training_steps_on_the_scanned_factored_path_lower_the_loss():
    model = tp.ScannedDecoder()
    params = model.init(jax.random.key(0), IDS)["params"]
    base, ad = _init("slora", params, jlora.linen.layouts(model, IDS))
    targets_ = jnp.asarray((IDS + 1) % tp.VOCAB)
    tx = jlora.optimizer(ad, optax.adam(3e-2))
    trainable, frozen = jlora.split(ad)
    state = tx.init(trainable)

    @jax.jit
    def step(t, s):
        def loss(t):
            logits = jlora.linen.apply(model, {"params": base}, jlora.combine(t, frozen), IDS)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets_).mean()

        value, g = jax.value_and_grad(loss)(t)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s, value

    losses = []
    for _ in range(8):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0]


def test_layouts_survive_saving_and_loading(tmp_path):
    model = tp.ScannedDecoder()
    params = model.init(jax.random.key(0), IDS)["params"]
    cfg = make_config("nlora", rank=2)
    layouts = jlora.linen.layouts(model, IDS)
    base, ad = jlora.init(cfg, params, 0, layouts=layouts)
    from jlora import persist

    persist.save_adapters(tmp_path / "ad", ad, cfg)
    back = persist.load_adapters(tmp_path / "ad")[0]
    for p, a in ad.items():
        assert back[p].spec == a.spec and back[p].spec.matrix_layout == layouts[p]
    flat = targets.flatten(jlora.merge(base, back))
    assert flat["layers/q_einsum/kernel"].shape == (tp.LAYERS, tp.HEADS, tp.D, tp.HEAD_DIM)
