"""The hand-written backward pass of `jlora.lowrank` equals autodiff of the plain expression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.lowrank import lowrank


def reference(x, A, M, B, s):
    h = x @ A
    if M is not None:
        h = h @ M
    return s * (h @ B)


@pytest.mark.parametrize("with_m", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_value_and_gradients_match_autodiff(with_m, lead):
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (*lead, 7))
    A = jax.random.normal(ks[1], (7, 3))
    M = jax.random.normal(ks[2], (3, 3)) if with_m else None
    B = jax.random.normal(ks[3], (3, 4))
    c = jax.random.normal(ks[4], (*lead, 4))

    def loss(fn):
        return lambda x, A, M, B: jnp.sum(jnp.tanh(fn(x, A, M, B, 0.7)) * c)

    np.testing.assert_allclose(lowrank(x, A, M, B, 0.7), reference(x, A, M, B, 0.7), rtol=1e-6)
    got = jax.grad(loss(lowrank), argnums=(0, 1, 2, 3))(x, A, M, B)
    want = jax.grad(loss(reference), argnums=(0, 1, 2, 3))(x, A, M, B)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_bf16_gradients():
    x = jnp.ones((2, 4), jnp.bfloat16)
    A, B = jnp.ones((4, 2), jnp.bfloat16), jnp.ones((2, 3), jnp.bfloat16)
    gA, gB = jax.grad(
        lambda A, B: jnp.sum(lowrank(x, A, None, B, 2.0)).astype(jnp.float32), argnums=(0, 1)
    )(A, B)
    assert gA.dtype == gB.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gB, np.float32), 2.0 * 2 * 4 * np.ones((2, 3)))
