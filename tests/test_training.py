"""Smoke test: every method learns a synthetic 8-cluster classification from a random base."""

from __future__ import annotations

import flax.linen as nn
import jax
import optax
import pytest
from conftest import VARIANTS, make_config

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.gelu(nn.Dense(48, name="fc1")(x))
        x = jax.nn.gelu(nn.Dense(64, name="fc2")(x))
        return nn.Dense(8, name="head")(x)


@pytest.fixture(scope="module")
def task():
    k = jax.random.split(jax.random.key(0), 4)
    centers = jax.random.normal(k[0], (8, 16)) * 1.5
    labels = jax.random.randint(k[1], (256,), 0, 8)
    x = centers[labels] + 0.5 * jax.random.normal(k[2], (256, 16))
    model = MLP()
    return model, model.init(k[3], x)["params"], x, labels


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_method_halves_the_loss(variant, task):
    model, params, x, labels = task

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    cfg = make_config(variant, rank=8)
    grads = None
    if cfg.method == "gora":
        grads = jlora.gradient_stats(
            lambda p, b: ce(model.apply({"params": p}, b)), params, [x], cfg
        )
    base, adapters = jlora.init(cfg, params, jax.random.key(1), grads=grads)
    # NOLA's coefficients need a higher learning rate than LoRA weights (paper: 1e-3 vs 1e-4).
    tx = jlora.optimizer(adapters, optax.adam(3e-2 if cfg.method == "nola" else 1e-2))

    def loss_fn(a, b):
        with jlora.inject(a):
            return ce(model.apply({"params": b}, x))

    @jax.jit
    def step(a, s, b):
        loss, g = jax.value_and_grad(loss_fn)(a, b)
        u, s = tx.update(g, s, a)
        return optax.apply_updates(a, u), s, loss

    state = tx.init(adapters)
    first = None
    for _ in range(200):
        adapters, state, loss = step(adapters, state, base)
        first = float(loss) if first is None else first
    final = float(loss_fn(adapters, base))
    assert final <= 0.5 * first, (first, final)
