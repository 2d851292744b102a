"""GoRA's pre-pass: the mean gradient of the target kernels, compiled once."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_config, rel_err

import jlora
from jlora import gradstats, targets


def test_mean_gradient_of_targets_only(tiny):
    model, params, _ = tiny
    batches = [jax.random.randint(jax.random.key(i), (2, 7), 0, 40) for i in range(4)]

    def loss_fn(p, ids):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    cfg = make_config("gora", targets=r".*/(query|value|up)/kernel")
    gradstats._accumulate.clear_cache()
    grads = jlora.gradient_stats(loss_fn, params, batches, cfg)
    assert gradstats._accumulate._cache_size() == 1  # one compilation for one batch shape
    assert set(grads) == {t.path for t in targets.select(params, cfg.targets, 4, 16.0)}
    full = [targets.flatten(jax.grad(loss_fn)(params, b)) for b in batches]
    for p, g in grads.items():
        assert g.dtype == jnp.float32
        assert rel_err(g, np.mean([f[p] for f in full], axis=0)) <= 1e-5
    _, adapters = jlora.init(cfg, params, jax.random.key(0), grads=grads)
    assert set(adapters) == set(grads)


def test_empty_batches_fail(tiny):
    _model, params, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        jlora.gradient_stats(lambda p, b: 0.0, params, [], make_config("gora"))


class _Mixed(nn.Module):
    """A targeted Dense (tapped) and a kernel used by a hand-written matmul (autodiff)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6, name="dense")(x))
        raw = self.param("raw", nn.initializers.normal(0.5), (6, 5))
        return (h @ raw).sum(-1)


def test_tapped_dense_and_plain_matmul_kernels_match_autodiff():
    model = _Mixed()
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    params = model.init(jax.random.key(0), x)["params"]
    params = {"dense": params["dense"], "raw": {"kernel": params["raw"]}}

    def loss_fn(p, xb):
        ps = {"dense": p["dense"], "raw": p["raw"]["kernel"]}
        return jnp.mean(model.apply({"params": ps}, xb) ** 2)

    cfg = make_config("gora", targets=r".*kernel")
    batches = [x, 2.0 * x[:, ::-1]]
    got = jlora.gradient_stats(loss_fn, params, batches, cfg)
    want = [targets.flatten(jax.grad(loss_fn)(params, b)) for b in batches]
    assert set(got) == {"dense/kernel", "raw/kernel"}
    for p, g in got.items():
        assert rel_err(g, np.mean([w[p] for w in want], axis=0)) <= 1e-5

    # Only the Flax Dense is tapped; the raw kernel's gradient comes from autodiff.
    tapped: set[str] = set()
    probes = {p: jnp.zeros_like(g) for p, g in got.items()}

    def tapped_loss(pr):
        with jlora.linen.tap.tap(pr, tapped):
            return loss_fn(params, x)

    dprobe = jax.grad(tapped_loss)(probes)
    assert tapped == {"dense/kernel"}
    assert rel_err(dprobe["dense/kernel"], want[0]["dense/kernel"]) <= 1e-5
    assert float(jnp.abs(dprobe["raw/kernel"]).max()) == 0.0


class _ScanBody(nn.Module):
    """Two Dense layers stacked by nn.scan: one (2, 4, 4) target kernel, sliced per layer."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(name="stack")(x, None)[0]


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(4, name="dense")(c)), None


def test_stacked_kernels_fall_back_to_autodiff():
    model = _ScanBody()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    params = model.init(jax.random.key(0), x)["params"]
    assert params["stack"]["dense"]["kernel"].shape == (2, 4, 4)

    def loss_fn(p, xb):
        return jnp.sum(model.apply({"params": p}, xb) ** 2)

    got = jlora.gradient_stats(loss_fn, params, [x], make_config("gora", targets=r".*kernel"))
    want = targets.flatten(jax.grad(loss_fn)(params, x))
    assert rel_err(got["stack/dense/kernel"], want["stack/dense/kernel"]) <= 1e-5


def _doubled_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    return 2.0 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)


def test_dense_with_custom_dot_general_keeps_autodiff():
    # A Dense whose product is not `x @ K` (here 2·x@K, as a stand-in for a quantized dot) must
    # not be tapped: the tap would return xᵀg, half the true gradient.
    model = nn.Dense(3, dot_general=_doubled_dot)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, xb):
        return jnp.sum(jnp.tanh(model.apply({"params": p}, xb)))

    got = jlora.gradient_stats(loss_fn, params, [x], make_config("gora", rank=2))
    want = jax.grad(loss_fn)(params, x)["kernel"]
    assert rel_err(got["kernel"], want) <= 1e-5
