"""GoRA's pre-pass: the mean gradient of the target kernels, compiled once."""

from __future__ import annotations

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
