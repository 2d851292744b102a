"""A method defined entirely in this file runs through everything jlora does with a method.

`Toy` has its own options, a whole-model step (`plan`: a seed per target and its position), a
frozen leaf regenerated from the seed (A, never stored by exports), a trainable rank vector d at a
learning-rate ratio and a trainable B: `ΔK = s · (A · d) @ B`. Nothing outside this file knows it;
registering it is the one line in the `toy` fixture.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import jlora
from jlora import persist, validation
from jlora.errors import ConfigError
from jlora.interop import peft as jpeft
from jlora.methods import IN, METHODS, OUT, RANK, AdapterSpec, Leaf, Method, Options


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyOptions(Options):
    prefix = "toy"
    # Initial value of the trainable rank vector d.
    init_d: float = 0.5

    def __post_init__(self) -> None:
        ok = validation.as_float(self._flat("init_d"), self.init_d, lambda x: x > 0, "> 0")
        self._set("init_d", ok)


def _random_a(spec: AdapterSpec) -> jax.Array:
    bound = 1.0 / math.sqrt(spec.d_in)
    key = jax.random.key(spec.seed)
    return jax.random.uniform(key, (spec.d_in, spec.rank), jnp.float32, -bound, bound)


class Toy(Method):
    name = "toy"
    options_class = ToyOptions

    def plan(self, specs, kernels, grads, keys) -> dict[str, AdapterSpec]:
        out = {}
        for i, (p, s) in enumerate(sorted(specs.items())):
            seed = int(jax.random.randint(keys[p], (), 0, 2**31 - 1))
            out[p] = dataclasses.replace(s, seed=seed, info=(("position", i),))
        return out

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        return {
            "A": Leaf((IN, RANK), trainable=False, regenerable=True),
            "d": Leaf((RANK,)),
            "B": Leaf((RANK, OUT)),
        }

    def lr_ratios(self, options: Options) -> tuple[tuple[str, float], ...]:
        return (("d", 2.0),)

    def regenerate(self, spec: AdapterSpec) -> dict[str, jax.Array]:
        return {"A": _random_a(spec)}

    def init(self, K, key, spec, grad) -> dict[str, jax.Array]:
        return {
            "A": _random_a(spec),
            "d": jnp.full((spec.rank,), spec.options.init_d, jnp.float32),
            "B": jnp.zeros((spec.rank, spec.d_out), jnp.float32),
        }

    def factors(self, params: Mapping[str, jax.Array], spec: AdapterSpec):
        return params["A"] * params["d"], None, params["B"]


class Net(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.tanh(nn.Dense(12, name="up")(x))
        return nn.Dense(3, name="down")(x)


@pytest.fixture
def toy():
    jlora.methods.register(Toy())
    yield METHODS["toy"]
    METHODS.unregister("toy")


@pytest.fixture
def setup(toy):
    model = Net()
    x = jax.random.normal(jax.random.key(1), (16, 6))
    y = jax.random.normal(jax.random.key(2), (16, 3))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = jlora.AdapterConfig(method="toy", rank=2, alpha=4.0, toy_init_d=0.25)
    base, adapters = jlora.init(cfg, params, jax.random.key(3))
    return model, x, y, params, cfg, base, adapters


def test_config_registry_and_specs(setup):
    _, _, _, params, cfg, base, adapters = setup
    assert "toy" in jlora.METHODS and jlora.METHODS is jlora.methods.METHODS
    assert cfg.options == ToyOptions(init_d=0.25) and cfg.to_flat()["toy_init_d"] == 0.25
    with pytest.raises(ConfigError, match=r"AdapterConfig\.toy_init_d=-1 is invalid: expected > 0"):
        jlora.AdapterConfig(method="toy", toy_init_d=-1)
    with pytest.raises(ConfigError, match=r"toy_init_d.*no such option for method 'lora'"):
        jlora.AdapterConfig(method="lora", toy_init_d=1.0)
    assert base is params  # not a residual method
    up, down = adapters["up/kernel"], adapters["down/kernel"]
    assert up.spec.get("position") == 1 and down.spec.get("position") == 0
    assert up.spec.seed != down.spec.seed and up.spec.trainable == ("d", "B")
    assert {n: x.shape for n, x in up.params.items()} == {"A": (6, 2), "d": (2,), "B": (2, 12)}
    assert up.spec.scale == 2.0
    row = {r["path"]: r for r in jlora.summary(adapters)}["up/kernel"]
    assert row["trainable"] == 2 + 24 and row["frozen"] == 12 and row["position"] == 1


def test_merged_and_factored_paths_agree_and_unmerge(setup):
    model, x, _, params, _, base, adapters = setup
    rng = np.random.default_rng(0)
    trained = {
        p: a.replace(params={**a.params, "B": jnp.asarray(rng.normal(size=a.params["B"].shape))})
        for p, a in adapters.items()
    }
    merged = model.apply({"params": jlora.merge(base, trained)}, x)
    with jlora.inject(trained):
        factored = model.apply({"params": base}, x)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    up = trained["up/kernel"]
    want = up.spec.scale * (up.params["A"] * up.params["d"]) @ up.params["B"]
    np.testing.assert_allclose(jlora.delta(trained)["up/kernel"], want, rtol=1e-6, atol=1e-6)
    back = jlora.unmerge(jlora.merge(base, trained), trained)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_optimizer_and_a_training_step(setup):
    model, x, y, _, _, base, adapters = setup
    trainable, frozen = jlora.split(adapters)
    assert set(trainable["up/kernel"].params) == {"d", "B"}
    assert set(frozen["up/kernel"].params) == {"A"}
    tx = jlora.optimizer(adapters, optax.sgd(0.1))
    labels = jlora.optim.labels(adapters)["up/kernel"].params
    assert labels == {"A": "frozen", "d": "lr×2+wd", "B": "lr×1+wd"}

    def loss(t):
        with jlora.inject(jlora.combine(t, frozen)):
            return jnp.mean((model.apply({"params": base}, x) - y) ** 2)

    full = jlora.combine(trainable, frozen)
    state = tx.init(full)
    losses = []
    for _ in range(5):
        value, g = jax.value_and_grad(loss)(trainable)
        losses.append(float(value))
        g_full = jlora.combine(g, jax.tree.map(jnp.zeros_like, frozen))
        updates, state = tx.update(g_full, state, full)
        full = optax.apply_updates(full, updates)
        trainable, new_frozen = jlora.split(full)
        np.testing.assert_array_equal(
            new_frozen["up/kernel"].params["A"], adapters["up/kernel"].params["A"]
        )
    assert losses[-1] < losses[0]
    # d moved at twice B's rate: the first SGD step of d is −2·0.1·∂d
    assert not np.allclose(full["up/kernel"].params["d"], 0.25)


def test_jlora_format_stores_no_regenerable_leaf(setup, tmp_path):
    _, _, _, _, cfg, _, adapters = setup
    rng = np.random.default_rng(1)
    trained = {
        p: a.replace(params={**a.params, "d": jnp.asarray(rng.normal(size=a.params["d"].shape))})
        for p, a in adapters.items()
    }
    folder = persist.save_adapters(tmp_path / "toy", trained, cfg)
    stored = load_file(str(folder / persist.JLORA_FILE))
    assert sorted(stored) == sorted(f"{p}::{n}" for p in trained for n in ("d", "B"))
    doc = json.loads((folder / persist.CONFIG_FILE).read_text())
    assert doc["config"]["toy_init_d"] == 0.25
    assert doc["targets"]["up/kernel"]["spec"]["options"] == {"toy_init_d": 0.25}
    loaded, cfg2, _, _ = persist.load_adapters(folder)
    assert cfg2 == cfg
    for p, a in trained.items():
        assert loaded[p].spec == a.spec
        for n, v in a.params.items():
            np.testing.assert_array_equal(loaded[p].params[n], v)
    A, B = jpeft.fold("up/kernel", trained["up/kernel"])
    np.testing.assert_allclose(
        trained["up/kernel"].spec.scale * A @ B, jlora.delta(trained)["up/kernel"], atol=1e-6
    )
