"""Per-layer rematerialisation (issue 13, part 1): `remat="full"` and `"dots"` give the gradients
of `remat="none"` for both model families, adapters injected (dropout on), with the same
parameter paths, and a bad policy fails naming the field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model

import jlora
import jlora.models as jm
from jlora.train import config as config_lib

B, T = 2, 6


@pytest.fixture(scope="module", params=["llama", pytest.param("bert", marks=pytest.mark.slow)])
def setup(request):
    model = tiny_model(request.param)
    ids = jax.random.randint(jax.random.key(1), (B, T), 3, 50)
    mask = jnp.ones((B, T), jnp.int32).at[0, -2:].set(0)
    params = model.init(jax.random.key(0), ids, mask)["params"]
    cfg = jlora.AdapterConfig(
        method="slora", rank=4, dropout=0.1, targets=jm.preset(model, "all-linear")
    )
    base, adapters = jlora.init(cfg, params, 0)
    # Random (not constant: LayerNorm cancels a constant B) perturbation, so that every adapter
    # leaf contributes to the forward pass and has a non-zero gradient.
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    return model, ids, mask, base, adapters


def _grads(model, ids, mask, base, adapters, remat):
    model = model.clone(remat=remat)
    trainable, frozen = jlora.split(adapters)

    def loss(tr, base):
        with jlora.inject(jlora.combine(tr, frozen), rng=jax.random.key(3)):
            out = model.apply({"params": base}, ids, mask)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(trainable, base)


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_gives_the_same_loss_and_gradients(setup, remat):
    want_loss, want = _grads(*setup, "none")
    got_loss, got = _grads(*setup, remat)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    # Relative to the largest gradient: a leaf whose exact gradient is zero (BERT's key bias:
    # softmax ignores a shift of the scores) holds float noise (~1e-9) that differs with the
    # recomputation order.
    scale = max(float(np.abs(w).max()) for _, w in flat_want)
    for (path, g), (_, w) in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
    # The adapters' gradients are not trivially small (dropout and injection ran inside remat).
    assert all(float(np.abs(x).max()) > 1e-4 * scale for x in jax.tree.leaves(got[0]))


def test_remat_keeps_parameter_paths(setup):
    model, ids, mask, *_ = setup
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    for remat in ("full", "dots"):
        again = jax.eval_shape(model.clone(remat=remat).init, jax.random.key(0), ids, mask)
        assert jax.tree.structure(again) == jax.tree.structure(shapes)


def test_a_bad_policy_names_the_field():
    ids = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"Llama\.remat='some' is invalid: expected one of"):
        tiny_model("llama").clone(remat="some").init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match=r"Bert\.remat=True is invalid"):
        tiny_model("bert").clone(remat=True).init(jax.random.key(0), ids)
    with pytest.raises(config_lib.ConfigError, match=r"model\.remat='dot'"):
        config_lib.from_dict({"model": {"remat": "dot"}})
    assert config_lib.from_dict({"model": {"remat": "dots"}}).model.remat == "dots"
    assert "model.remat" in config_lib.RESUMABLE
