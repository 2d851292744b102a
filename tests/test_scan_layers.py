"""jlora's own Llama and BERT with their layers under `nn.scan` (`scan_layers=True`): the same
function as the unrolled model on stacked weights, presets that match both layouts, and every
adapter on the factored path equal to the merged path."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fake_grads, rel_err
from flax import nnx

import jlora
import jlora.models as jm
from jlora.methods import METHODS, Layer
from jlora.models.bert import Bert, BertConfig
from jlora.models.llama import Llama, LlamaConfig
from jlora.models.scan import stack_layers, unstack_layers

LLAMA = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
BERT = BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=16,
    num_labels=2,
)
IDS = jnp.asarray((np.arange(12).reshape(2, 6) * 5 + 1) % 32)


def _pair(family: str):
    """(unrolled model, scanned model, unrolled params, stacked params, layer prefix)."""
    if family == "llama":
        m, ms, where = Llama(LLAMA), Llama(LLAMA, scan_layers=True), ("model", "layers")
    else:
        m, ms, where = Bert(BERT), Bert(BERT, scan_layers=True), ("encoder", "layer")
    p = m.init(jax.random.key(0), IDS)["params"]
    p = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, p)  # pretrained-like weights
    return m, ms, p, stack_layers(p, *where), where


def _scanned_adapters(ms, ps, method: str):
    """`(base, adapters)` of `method` on every linear kernel of the stacked params `ps`, the
    adapters moved off their init (B = 0) so that they change the output."""
    cfg = jlora.AdapterConfig(
        method=method,
        rank=2,
        targets=jm.preset(ms, "all-linear"),
        **({"gora_rank_range": (1, 4)} if method == "gora" else {}),
    )
    grads = fake_grads(ps) if method == "gora" else None
    base, ad = jlora.init(cfg, ps, 0, grads=grads, layouts=jlora.stacked_layouts(ps))
    return base, {
        p: a.replace(params={n: x + 0.1 for n, x in a.params.items()}) for p, a in ad.items()
    }


@pytest.mark.parametrize("family", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_scanned_model_is_the_unrolled_model_on_stacked_weights(family):
    m, ms, p, ps, where = _pair(family)
    shapes = jax.tree.map(lambda x: x.shape, ms.init(jax.random.key(0), IDS)["params"])
    assert shapes == jax.tree.map(lambda x: x.shape, ps)  # init makes the stacked layout
    assert rel_err(ms.apply({"params": ps}, IDS), m.apply({"params": p}, IDS)) <= 1e-5
    back = unstack_layers(ps, *where)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, p))
    for preset in ("attention", "all-linear"):
        n_unrolled = len(
            jlora.targets.select(p, [jlora.Rule(pattern=jm.preset(m, preset))], 2, 4.0)
        )
        rules = [jlora.Rule(pattern=jm.preset(ms, preset))]
        n_scanned = len(jlora.targets.select(ps, rules, 2, 4.0, jlora.stacked_layouts(ps)))
        assert n_unrolled == 3 * n_scanned  # one stacked kernel per projection


# GoRA on Llama in `make test`; slow: each family once more, with NOLA's per-layer bases and
# DoRA's per-layer kernel norms. (Every variant runs on scanned NNX layers in test_nnx.py; the
# other pairs here, about 25 s of CI time each, were dropped to fit CI's time limit.)
@pytest.mark.parametrize(
    ("family", "method"),
    [
        pytest.param(f, m, marks=() if (f, m) == ("llama", "gora") else pytest.mark.slow)
        for f, m in [("llama", "gora"), ("llama", "nola"), ("bert", "lora"), ("bert", "dora")]
    ],
)
def test_adapters_on_scanned_layers_factored_equals_merged(family, method):
    _, ms, _, ps, _ = _pair(family)
    base, ad = _scanned_adapters(ms, ps, method)
    want = ms.apply({"params": jlora.merge(base, ad)}, IDS)
    got = jlora.linen.apply(ms, {"params": base}, ad, IDS)
    assert rel_err(got, want) <= 1e-5


def test_scanned_llama_has_no_cache():
    ms = Llama(LLAMA, scan_layers=True)
    ps = ms.init(jax.random.key(0), IDS)["params"]
    with pytest.raises(ValueError, match=r"scan_layers=True\) has no key/value cache"):
        ms.apply({"params": ps}, IDS, cache=Llama(LLAMA).init_cache(2, 8), cache_index=0)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=() if m == "gora" else pytest.mark.slow)
        # GoRA's per-layer ranks and scales, NOLA's per-layer bases, VeRA's shared matrices:
        # the slicing cases (lora, slora, dora, pissa slice plain factors as NOLA's do).
        for m in ("gora", "nola", "vera")
    ],
)
def test_unstacked_adapters_on_the_unrolled_model_equal_the_scanned_model(method):
    """`unstack_adapters` is exact: the unrolled model with each layer's slice (NOLA's own
    bases, GoRA's own scale) computes what the scanned model does, factored and merged."""
    from jlora.models.scan import unscanned, unstack_adapters

    _, ms, _, ps, where = _pair("llama")
    base, ad = _scanned_adapters(ms, ps, method)
    want = jlora.linen.apply(ms, {"params": base}, ad, IDS)
    m, p = unscanned(ms, base)
    per_layer = unstack_adapters(ad, *where)
    assert len(per_layer) == 3 * len(ad)
    assert all(not a.spec.stack for a in per_layer.values())
    if method == "gora":  # each layer keeps its own scale
        differ = [
            p
            for p in ad
            if len({per_layer[p.replace("layers/", f"layers_{i}/")].spec.scale for i in range(3)})
            > 1
        ]
        assert differ
    with jlora.inject(per_layer):
        got = m.apply({"params": p}, IDS)
    assert rel_err(got, want) <= 1e-5
    merged = m.apply({"params": jlora.merge(p, per_layer)}, IDS)
    assert rel_err(merged, want) <= 1e-5


def test_unstack_refuses_an_unstacked_adapter():
    _, ad = jlora.init(jlora.AdapterConfig(rank=2), {"q": {"kernel": jnp.ones((4, 4))}}, 0)
    with pytest.raises(ValueError, match="no leading stacked axis"):
        jlora.factored.unstack(ad["q/kernel"])


class _DenseBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(8, name="fc")(x), None


class _LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _DenseBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(name="layers")(x, None)[0]


class _NnxStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(8, 8, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, layer):
            return layer(x)

        return run(x, self.layers)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_adapter_dropout_draws_one_mask_per_scanned_layer(framework):
    """Inside a scan each layer's dropout key is the target's key with its layer index folded
    in (`factored.layer_key`): the scanned output equals the layer-by-layer computation with
    those keys, and differs from the output without dropout."""
    cfg = jlora.AdapterConfig(method="lora", rank=2, dropout=0.5)
    x = jax.random.normal(jax.random.key(3), (4, 8))
    key = jax.random.key(7)
    if framework == "linen":
        model = _LinenStack()
        params = model.init(jax.random.key(0), x)["params"]
        base, ad = jlora.init(cfg, params, 0, layouts=jlora.linen.layouts(model, x))
        ad = {p: a.replace(params={n: v + 0.1 for n, v in a.params.items()}) for p, a in ad.items()}
        run = lambda k: jlora.linen.apply(model, {"params": base}, ad, x, rng=k)  # noqa: E731
        layer = base["layers"]["fc"]
    else:
        model = _NnxStack(nnx.Rngs(0))
        ad = jlora.nnx.adapt(model, cfg, 0)
        for p, a in ad.items():  # B = 0 at init: give the adapters an output
            ad[p] = a.replace(params={n: v + 0.1 for n, v in a.params.items()})
        jlora.nnx.attach(model, ad)

        def run(k):
            with jlora.nnx.dropout(k):
                return model(x)

        layer = {"kernel": model.layers.kernel[...], "bias": model.layers.bias[...]}
    ((path, adapter),) = ad.items()
    target_key = jax.random.fold_in(key, jlora.targets.stable_hash(path))
    want = x
    for i, one in enumerate(jlora.factored.unstack(adapter)):
        K, b = layer["kernel"][i], layer["bias"][i]
        k = jax.random.fold_in(target_key, jnp.uint32(i))
        layer_i = Layer({"kernel": K, "bias": b}.get)
        want = METHODS["lora"].output(want, want @ K + b, layer_i, one.params, one.spec, k)
    got = run(key)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(run(None), want) > 1e-3  # no key: no dropout


def test_nola_regenerated_bases_are_drawn_again_for_the_backward_pass():
    """`nola_basis="regenerate"` on scanned layers: the coefficients' gradients are those of
    cached bases, and the compiled gradient keeps no layer's bases for the backward pass (it
    draws them again from the key), so its scratch memory stays well below the bases' size.
    Autodiff of the plain draw kept them all, as much memory as `"cache"` holds (here 12
    layers: what is left is one layer's draws, whose XLA:CPU loops hold several times a
    layer's bases)."""
    ms = Llama(dataclasses.replace(LLAMA, num_hidden_layers=12), scan_layers=True)
    ps = ms.init(jax.random.key(0), IDS)["params"]

    def gradient(basis: str):
        cfg = jlora.AdapterConfig(
            method="nola",
            rank=2,
            targets=jm.preset(ms, "all-linear"),
            nola_num_basis=(512, 512),
            nola_basis=basis,
        )
        base, ad = jlora.init(cfg, ps, 0, layouts=jlora.stacked_layouts(ps))
        coefs = {
            p: {n: a.params[n] + 0.1 * (i + 1) for n in ("alpha", "beta")}
            for i, (p, a) in enumerate(ad.items())
        }

        def loss(c):
            trained = {p: a.replace(params={**a.params, **c[p]}) for p, a in ad.items()}
            return jnp.sum(jlora.linen.apply(ms, {"params": base}, trained, IDS) ** 2)

        f = jax.jit(jax.grad(loss))
        scratch = f.lower(coefs).compile().memory_analysis().temp_size_in_bytes
        return f(coefs), scratch, ad

    regenerated, scratch, _ = gradient("regenerate")
    cached, _, ad_cached = gradient("cache")
    for p in regenerated:
        for n in ("alpha", "beta"):
            np.testing.assert_allclose(regenerated[p][n], cached[p][n], rtol=1e-5, atol=1e-6)
    bases = sum(
        x.nbytes for a in ad_cached.values() for n, x in a.params.items() if n.endswith("basis")
    )
    assert scratch < bases / 2, (scratch, bases)
