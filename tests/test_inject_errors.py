"""`jlora.inject` errors: adapters that match no module that ran (strict), adapters made for
other kernel shapes, and the body's own exceptions passing through unchanged."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import Tiny, init_variant

import jlora


def _renamed(adapters: jlora.Adapters, old: str, new: str) -> jlora.Adapters:
    return {(new if p == old else p): a for p, a in adapters.items()}


def test_inject_strict_raises_on_unmatched_adapter(tiny):
    model, params, ids = tiny
    _, adapters = init_variant("lora", params)
    typo = _renamed(adapters, "block_0/query/kernel", "block_0/querry/kernel")
    with (
        pytest.raises(ValueError, match=r"1 of \d+ adapters") as e,
        jlora.inject(typo),
    ):
        model.apply({"params": params}, ids)
    msg = str(e.value)
    assert "'block_0/querry/kernel'" in msg
    assert "closest modules that ran: 'block_0/query/kernel'" in msg
    assert "strict=False" in msg and "\n" not in msg


def test_inject_strict_lists_first_few_and_count(tiny):
    model, params, ids = tiny
    _, adapters = init_variant("lora", params)
    ghosts = {f"ghost_{i}/kernel": adapters["head/kernel"] for i in range(9)}
    with (
        pytest.raises(ValueError, match=r"9 of \d+ adapters") as e,
        jlora.inject({**adapters, **ghosts}),
    ):
        model.apply({"params": params}, ids)
    msg = str(e.value)
    assert "'ghost_0/kernel'" in msg and "'ghost_8/kernel'" not in msg
    assert "and 6 more" in msg


class TwoPart(nn.Module):
    """An encoder and a head; `method=TwoPart.encode` runs the encoder only."""

    def setup(self) -> None:
        self.body = nn.Dense(8)
        self.head = nn.Dense(3)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.body(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.encode(x))


@pytest.fixture(scope="module")
def two_part():
    model, x = TwoPart(), jnp.ones((2, 5))
    params = model.init(jax.random.key(0), x)["params"]
    base, adapters = jlora.init(jlora.AdapterConfig(method="slora", rank=2), params)
    return model, base, adapters, x


def test_inject_strict_false_allows_part_of_the_model(two_part):
    model, base, adapters, x = two_part
    want = model.apply({"params": jlora.merge(base, adapters)}, x, method=TwoPart.encode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with jlora.inject(adapters, strict=False):
            y = model.apply({"params": base}, x, method=TwoPart.encode)
    assert jnp.allclose(y, want, atol=1e-6)
    with (
        pytest.raises(ValueError, match=r"1 of 2 adapters .*'head/kernel'"),
        jlora.inject(adapters),
    ):
        model.apply({"params": base}, x, method=TwoPart.encode)


def test_inject_strict_none_ran_is_an_error(tiny):
    model, params, ids = tiny
    _, adapters = init_variant("lora", {"other": params})
    with pytest.raises(ValueError, match="no targeted module ran"), jlora.inject(adapters):
        model.apply({"params": params}, ids)
    with (
        pytest.warns(UserWarning, match="no targeted module ran"),
        jlora.inject(adapters, strict=False),
    ):
        model.apply({"params": params}, ids)


def test_inject_strict_jitted_before_context(tiny):
    """A function traced outside the context runs no interceptor: strict says so."""
    model, params, ids = tiny
    base, adapters = init_variant("lora", params)
    fwd = jax.jit(lambda b: model.apply({"params": b}, ids))
    fwd(base)
    with pytest.raises(ValueError, match="inside the jitted function"), jlora.inject(adapters):
        fwd(base)


def test_inject_does_not_mask_the_body_exception(two_part):
    """The body's exception passes through; the unmatched-adapter check does not replace it."""
    model, base, adapters, x = two_part
    with pytest.raises(ZeroDivisionError), jlora.inject(adapters):
        1 / 0  # noqa: B018
    with pytest.raises(KeyError, match="boom"), jlora.inject(adapters):
        model.apply({"params": base}, x, method=TwoPart.encode)  # the head's adapter unused
        raise KeyError("boom")


def test_inject_rejects_adapters_of_another_model(tiny):
    """Adapters for a 41-word head on a 40-word head: the path and both kernel shapes."""
    model, params, ids = tiny
    other = Tiny(vocab=41).init(jax.random.key(0), ids)["params"]
    _, adapters = init_variant("lora", other)
    with (
        pytest.raises(ValueError, match=r"'head/kernel'.*\(32, 41\).*\(32, 40\)"),
        jlora.inject(adapters),
    ):
        model.apply({"params": params}, ids)


@pytest.mark.parametrize("module", [nn.Dense(4), nn.DenseGeneral(4)])
def test_inject_rejects_wrong_input_width(module):
    """The d_in mismatch fails inside `x @ A` otherwise."""
    x = jnp.ones((2, 8))
    params = module.init(jax.random.key(0), x)["params"]
    wide = {"kernel": jnp.ones((9, 4)), "bias": params["bias"]}
    _, adapters = jlora.init(jlora.AdapterConfig(method="lora", rank=2), wide)
    with pytest.raises(ValueError, match=r"'kernel'.*\(9, 4\).*\(8, 4\)"), jlora.inject(adapters):
        module.apply({"params": params}, x)
