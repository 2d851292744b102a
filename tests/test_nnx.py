"""NNX models jlora did not write (tests/thirdparty.py): layouts from the layers, every method's
factored path (adapters as layer variables) against the merged path, `nnx.Optimizer` training,
detaching, saving, and the errors for layers the factored path cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import thirdparty as tp
from conftest import fake_grads, rel_err
from flax import nnx
from test_linen_layers import (
    ALL,
    GRAD_METHODS,
    IDS,
    _perturb,
    assert_same_gradients,
    cases,
    fp32_tol,
)

import jlora
from jlora import persist, targets

FAST = ("lora", "nola", "gora", "dora")


def _model(scan: bool) -> nnx.Module:
    return tp.NnxDecoder(nnx.Rngs(0), scan=scan)


def _init(model, variant: str, **overrides):
    kw = {**ALL[variant], "rank": 2, **overrides}
    cfg = jlora.AdapterConfig(**kw)
    params = nnx.state(model, nnx.Param)
    grads = fake_grads(params) if cfg.method in GRAD_METHODS else None
    lay = jlora.nnx.layouts(model)
    return cfg, *jlora.init(cfg, params, jax.random.key(1), grads=grads, layouts=lay)


def test_layouts_come_from_the_layers():
    lay = jlora.nnx.layouts(_model(scan=False))
    assert lay["layers/0/q_einsum/kernel"] == jlora.KernelLayout((), (1,), (0, 2))
    assert lay["layers/2/key/kernel"] == jlora.KernelLayout((), (0,), (1, 2))
    assert lay["layers/1/attn_vec_einsum/kernel"] == jlora.KernelLayout((), (0, 1), (2,))
    assert lay["layers/0/up/kernel"] == jlora.KernelLayout()
    stacked = jlora.nnx.layouts(_model(scan=True))  # layers made by nnx.vmap: one stacked axis
    assert stacked["layers/q_einsum/kernel"] == jlora.KernelLayout((0,), (2,), (1, 3))
    assert stacked["layers/up/kernel"] == jlora.KernelLayout((0,), (1,), (2,))


def _leaf_grads(model) -> dict[tuple[str, str], jax.Array]:
    """Gradients of the attached trainable leaves, keyed (kernel path, leaf name)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
        # Variables of the traced function's own (an nnx.scan inside refuses outer ones).
        return jnp.mean(nnx.merge(graphdef, lora, jax.tree.map(jnp.asarray, rest))(IDS) ** 2)

    value, g = jax.value_and_grad(loss)(lora)
    out = {}
    for path, x in targets.flatten(g).items():
        module, name = path.rsplit("/", 1)
        out[(f"{module}/kernel", name.removeprefix("jlora_"))] = x
    return value, out


# Every method on scanned (nnx.vmap) layers; on unrolled layers LoRA, and DoRA (a norm of the
# whole kernel) and VeRA (frozen matrices shared by the layers), slow. The other unrolled cases
# (each about 10 s of CI time) ran the same per-layer code as their scanned cases. Init options
# that only change the initial values (Gaussian rsLoRA, randomized PiSSA, random-sampling NLoRA)
# run in float64 in tests/test_linen_layers.py only.
UNROLLED = ("lora", "dora", "vera")
INIT_OPTIONS = ("lora_gaussian_rs", "pissa_rand", "nlora_random")


@pytest.mark.parametrize(
    ("variant", "scan"),
    [
        c
        for c in cases(FAST)
        if (c.values[1] or c.values[0] in UNROLLED) and c.values[0] not in INIT_OPTIONS
    ],
)
def test_factored_path_matches_merged_outputs_and_gradients(variant, scan):
    model = _model(scan)
    _, base, adapters = _init(model, variant)
    adapters = _perturb(adapters)
    trainable, frozen = jlora.split(adapters)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def merged_loss(t):
        merged = jlora.merge(base, jlora.combine(t, frozen))
        return jnp.mean(nnx.merge(graphdef, merged, jax.tree.map(jnp.asarray, rest))(IDS) ** 2)

    lm, gm = jax.value_and_grad(merged_loss)(trainable)
    nnx.update(model, base)
    jlora.nnx.attach(model, adapters)
    assert type(model.layers[0].q_einsum if not scan else model.layers.q_einsum).__name__ == (
        "AdaptedEinsum"
    )
    lf, gf = _leaf_grads(model)
    assert rel_err(lf, lm) <= 1e-5
    assert {k for k in gf} == {(p, n) for p, a in gm.items() for n in a.params}
    assert_same_gradients(
        [gf[(p, n)] for p, a in gm.items() for n in a.params],
        [a.params[n] for p, a in gm.items() for n in a.params],
        tol=fp32_tol(variant),
    )


def test_nnx_optimizer_trains_only_the_trainable_leaves():
    model = _model(scan=True)
    cfg = jlora.AdapterConfig(method="inttune", rank=2)
    jlora.nnx.adapt(model, cfg, 0)
    kernel0 = model.layers.up.kernel[...]
    frozen0 = model.layers.up.jlora_A[...]
    tx = jlora.nnx.optimizer(model, optax.adam(3e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    labels = jnp.asarray((IDS + 1) % tp.VOCAB)

    @nnx.jit
    def step(model, opt):
        def loss(model):
            logits = model(IDS)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, g)
        return value

    losses = [float(step(model, opt)) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0]
    assert bool(jnp.all(model.layers.up.kernel[...] == kernel0))  # the base is frozen
    assert bool(jnp.all(model.layers.up.jlora_A[...] == frozen0))  # IntTune's A is frozen
    assert isinstance(model.layers.up.jlora_A, jlora.nnx.Frozen)
    assert isinstance(model.layers.up.jlora_M, nnx.LoRAParam)


def test_gora_lr_ratio_and_gradient_stats_on_an_nnx_model():
    model = _model(scan=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, ids):
        return jnp.mean(nnx.merge(graphdef, p, jax.tree.map(jnp.asarray, rest))(ids) ** 2)

    cfg = jlora.AdapterConfig(method="gora", rank=2, gora_rank_range=(1, 6), targets=".*up/kernel")
    grads = jlora.gradient_stats(loss_fn, params, [IDS, IDS[::-1]], cfg)
    want = jax.grad(loss_fn)(params, IDS)
    assert grads["layers/up/kernel"].shape == (tp.LAYERS, tp.D, tp.FF)
    want2 = jax.grad(loss_fn)(params, IDS[::-1])
    mean = (
        targets.flatten(want)["layers/up/kernel"] + targets.flatten(want2)["layers/up/kernel"]
    ) / 2
    assert rel_err(grads["layers/up/kernel"], mean) <= 1e-5
    ad = jlora.nnx.adapt(model, cfg, 0, grads=grads)
    assert np.asarray(ad["layers/up/kernel"].spec.get("ranks")).shape == (tp.LAYERS,)
    tx = jlora.nnx.optimizer(model, optax.sgd(1.0))
    state = nnx.state(model, nnx.LoRAParam)
    ones = jax.tree.map(jnp.ones_like, state)
    updates, _ = tx.update(ones, tx.init(state), state)
    flat = targets.flatten(updates)
    assert float(flat["layers/up/jlora_A"].max()) == -1.0
    assert float(flat["layers/up/jlora_B"].max()) == -cfg.options.lr_ratio  # LoRA+ on B


def test_detach_merges_and_saved_adapters_come_back(tmp_path):
    model = _model(scan=True)
    cfg = jlora.AdapterConfig(method="slora", rank=2)
    ad = _perturb(jlora.nnx.adapt(model, cfg, 0))
    jlora.nnx.attach(model, ad)  # trained values
    y = model(IDS)
    persist.save_adapters(tmp_path / "ad", jlora.nnx.adapters(model), cfg)
    back = persist.load_adapters(tmp_path / "ad")[0]
    got = jlora.nnx.detach(model, merge=True)
    assert type(model.layers.up) is nnx.Linear and not hasattr(model.layers.up, "jlora_A")
    assert rel_err(model(IDS), y) <= 1e-5  # the merged kernels run the adapted function
    for p, a in got.items():
        for n, x in a.params.items():
            assert rel_err(x, back[p].params[n]) == 0.0
    fresh = _model(scan=True)
    jlora.nnx.attach(fresh, back)
    assert rel_err(fresh(IDS), y) <= 1e-5
    # On the state, merge and unmerge are inverses (the functional API on NNX states).
    params = nnx.state(_model(scan=True), nnx.Param)
    merged = jlora.merge(params, back)
    assert merged["layers"]["q_einsum"]["kernel"][...].shape == (
        tp.LAYERS,
        tp.HEADS,
        tp.D,
        tp.HEAD_DIM,
    )
    again = targets.flatten(jlora.unmerge(merged, back))
    for p, k in targets.flatten(params).items():
        assert rel_err(again[p], k) <= 1e-6, p


def test_an_nnx_moe_einsum_runs_one_adapter_per_expert():
    layer = nnx.Einsum("ECD,EDF->ECF", (3, 8, 4), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 5, 8))
    assert jlora.nnx.layouts(layer) == {"kernel": jlora.KernelLayout((0,), (1,), (2,))}
    cfg = jlora.AdapterConfig(method="lora", rank=2)
    params = nnx.state(layer, nnx.Param)
    base, ad = jlora.init(cfg, params, 0, layouts=jlora.nnx.layouts(layer))
    ad = _perturb(ad)
    graphdef, _ = nnx.split(layer)
    want = nnx.merge(graphdef, jlora.merge(base, ad))(x)
    jlora.nnx.attach(layer, ad)
    assert rel_err(layer(x), want) <= 1e-5


class RawKernel(nnx.Module):
    """A layer reading its own kernel."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (tp.D, tp.D)))

    def __call__(self, x):
        return x @ self.kernel[...]


class MyLinear(nnx.Linear):
    def __call__(self, x):
        return 2 * super().__call__(x)


def test_a_layer_the_factored_path_cannot_run_is_named():
    model = nnx.Sequential(nnx.Linear(tp.D, tp.D, rngs=nnx.Rngs(0)), RawKernel(nnx.Rngs(1)))
    cfg = jlora.AdapterConfig(method="lora", rank=2)
    with pytest.raises(ValueError, match=r"'layers/1/kernel' is not the kernel of an nnx.Linear"):
        jlora.nnx.adapt(model, cfg, 0)
    sub = nnx.Sequential(MyLinear(tp.D, tp.D, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="'layers/0/kernel' belongs to a MyLinear"):
        jlora.nnx.adapt(sub, cfg, 0)
