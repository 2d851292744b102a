"""jlora.optimizer trains exactly the trainable leaves; counts; LoRA+ ratio; decay; one trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import VARIANTS, init_variant

import jlora


def _train(model, base, adapters, ids, tx, steps=4):
    traces = []

    def loss_fn(a, b):
        with jlora.inject(a):
            logits = model.apply({"params": b}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(a, opt_state, b):
        traces.append(1)
        loss, g = jax.value_and_grad(loss_fn)(a, b)
        updates, opt_state = tx.update(g, opt_state, a)
        return optax.apply_updates(a, updates), opt_state, loss

    state = tx.init(adapters)
    losses = []
    for _ in range(steps):
        adapters, state, loss = step(adapters, state, base)
        losses.append(float(loss))
    return adapters, state, losses, len(traces)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_only_trainable_leaves_change(variant, tiny):
    model, params, ids = tiny
    base, adapters = init_variant(variant, params)
    base_copy = jax.tree.map(np.array, base)
    tx = jlora.optimizer(adapters, optax.adam(1e-2))
    trained, state, losses, traces = _train(model, base, adapters, ids, tx)
    assert traces == 1  # one compilation over repeated calls
    for p, a in adapters.items():
        for n, v in a.params.items():
            after = np.asarray(trained[p].params[n])
            if n in a.spec.trainable:
                assert not np.array_equal(after, v), (p, n)
            else:
                np.testing.assert_array_equal(after, v, err_msg=f"{p} {n}")
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy), strict=True):
        np.testing.assert_array_equal(x, y)
    # frozen leaves get no optimizer state: Adam keeps mu and nu of the trainable numbers only
    state_numbers = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert state_numbers == 2 * jlora.trainable_count(adapters)
    assert losses[-1] < losses[0]


def test_trainable_counts(tiny):
    _, params, _ = tiny
    r = 4
    _, it = init_variant("inttune", params, rank=r)
    assert jlora.trainable_count(it) == r * r * len(it)
    _, nola = init_variant("nola", params, rank=r)
    assert jlora.trainable_count(nola) == (16 + 12) * len(nola)
    _, sl = init_variant("slora", params, rank=r)
    want = sum(r * (row["shape"][0] + row["shape"][1]) + r * r for row in jlora.summary(sl))
    assert jlora.trainable_count(sl) == want
    rows = jlora.summary(it)
    assert {"path", "method", "rank", "shape", "trainable"} <= set(rows[0])
    assert rows[0]["frozen"] == r * (rows[0]["shape"][0] + rows[0]["shape"][1])


def test_gora_b_learning_rate_ratio(tiny):
    _, params, _ = tiny
    _base, adapters = init_variant("gora", params, gora_lr_ratio=16.0)
    tx = jlora.optimizer(adapters, optax.sgd(0.1))
    grads = jax.tree.map(jnp.ones_like, adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    for u in updates.values():
        np.testing.assert_allclose(u.params["A"], -0.1)
        np.testing.assert_allclose(u.params["B"], -1.6, rtol=1e-6)


def test_weight_decay_matches_adamw(tiny):
    _, params, _ = tiny
    _, adapters = init_variant("slora", params)
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = jlora.optimizer(adapters, optax.adam(sched), weight_decay=0.1, learning_rate=sched)
    ref = optax.adamw(sched, weight_decay=0.1)
    s, s_ref = tx.init(adapters), ref.init(adapters)
    a = a_ref = adapters
    for i in range(3):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x + i), a)
        u, s = tx.update(g, s, a)
        u_ref, s_ref = ref.update(g, s_ref, a_ref)
        a, a_ref = optax.apply_updates(a, u), optax.apply_updates(a_ref, u_ref)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(a_ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # a decay mask keeps M undecayed
    tx2 = jlora.optimizer(
        adapters,
        optax.sgd(0.0),
        weight_decay=0.5,
        learning_rate=1.0,
        decay=lambda path, name: name != "M",
    )
    u, _ = tx2.update(jax.tree.map(jnp.zeros_like, adapters), tx2.init(adapters), adapters)
    for p, ad in adapters.items():
        np.testing.assert_allclose(u[p].params["A"], -0.5 * ad.params["A"], rtol=1e-6)
        np.testing.assert_array_equal(u[p].params["M"], 0.0)


def test_weight_decay_needs_learning_rate(tiny):
    _, params, _ = tiny
    _, adapters = init_variant("lora", params)
    with pytest.raises(ValueError, match="learning_rate"):
        jlora.optimizer(adapters, optax.adam(1e-3), weight_decay=0.1)
