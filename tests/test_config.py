"""AdapterConfig validation and target selection."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora import targets
from jlora.errors import ConfigError


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("method", "qlora", "one of lora, pissa"),
        ("rank", 0, "integer >= 1"),
        ("rank", 2.5, "integer >= 1"),
        ("alpha", -1.0, "> 0"),
        ("dropout", 1.0, r"\[0, 1\)"),
        ("rslora", "yes", "True or False"),
        ("lora_init", "xavier", "'kaiming' or 'gaussian'"),
        ("pissa_niter", -1, "None"),
        ("nlora_core", "exact", "'raw' or 'pinv'"),
        ("nlora_sampling", "last", "'first' or 'random'"),
        ("nola_num_basis", (0, 4), "pair"),
        ("nola_num_basis", 8, "pair"),
        ("nola_basis", "disk", "'regenerate' or 'cache'"),
        ("gora_rank_range", (8, 4), "r_min <= r_max"),
        ("gora_gamma", float("nan"), ">= 0"),
        ("gora_lr_ratio", 0, "> 0"),
        ("targets", "(", "valid regular expression"),
        ("targets", [], "non-empty"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(field, value, allowed):
    owners = jlora.methods.option_names().get(field)
    method = {"method": owners[0]} if owners and field != "method" else {}
    with pytest.raises(ValueError, match=rf"AdapterConfig\.{field}.*{allowed}") as e:
        jlora.AdapterConfig(**method, **{field: value})
    assert repr(value) in str(e.value)


def test_options_are_per_method_and_flat_names_round_trip():
    from jlora.methods.nola import NolaOptions

    cfg = jlora.AdapterConfig(method="nola", rank=2, nola_num_basis=[4, 3])
    assert cfg.options == NolaOptions(num_basis=(4, 3)) and not hasattr(cfg.options, "gamma")
    assert cfg == jlora.AdapterConfig(method="nola", rank=2, options={"num_basis": (4, 3)})
    assert cfg == jlora.AdapterConfig(method="nola", rank=2, options=NolaOptions(num_basis=(4, 3)))
    assert jlora.AdapterConfig(**cfg.to_flat()) == cfg
    assert hash(cfg) == hash(jlora.AdapterConfig(**cfg.to_flat()))
    assert dataclasses.replace(cfg, rank=4).options == cfg.options


def test_misplaced_unknown_and_mismatched_options_fail_naming_the_field():
    with pytest.raises(
        ConfigError,
        match=r"AdapterConfig\.gora_rank_range=\(4, 8\) is invalid.*"
        r"no such option for method 'lora' \(an option of gora; lora's options: "
        r"lora_init\)",
    ):
        jlora.AdapterConfig(method="lora", gora_rank_range=(4, 8))
    with pytest.raises(TypeError, match="unexpected keyword argument 'nola_bases'"):
        jlora.AdapterConfig(method="nola", nola_bases=(4, 3))
    from jlora.methods.nola import NolaOptions

    with pytest.raises(ConfigError, match=r"AdapterConfig\.options=.*a GoraOptions"):
        jlora.AdapterConfig(method="gora", options=NolaOptions())
    with pytest.raises(ConfigError, match=r"AdapterConfig\.options=.*not 'gamma'"):
        jlora.AdapterConfig(method="nola", options={"gamma": 1.0})
    # an option is validated however it is given
    with pytest.raises(ConfigError, match=r"AdapterConfig\.nola_basis='disk'"):
        NolaOptions(basis="disk")


def test_random_sampling_needs_pinv_core():
    with pytest.raises(ValueError, match=r"nlora_core.*'pinv' when nlora_sampling='random'"):
        jlora.AdapterConfig(method="nlora", nlora_sampling="random")


def test_config_is_frozen_keyword_only_and_hashable():
    cfg = jlora.AdapterConfig(method="slora", targets=[r".*/q/kernel", (r".*/v/kernel", 4, 8.0)])
    assert cfg.targets == (
        jlora.Rule(pattern=r".*/q/kernel"),
        jlora.Rule(pattern=r".*/v/kernel", rank=4, alpha=8.0),
    )
    assert hash(cfg) == hash(jlora.AdapterConfig(method="slora", targets=cfg.targets))
    with pytest.raises(AttributeError):
        cfg.rank = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        jlora.AdapterConfig("lora")  # type: ignore[misc]
    single = jlora.AdapterConfig(targets=(r".*/q/kernel", 2, 4.0))
    assert single.targets == (jlora.Rule(pattern=r".*/q/kernel", rank=2, alpha=4.0),)


def test_scales():
    assert jlora.AdapterConfig(rank=8, alpha=16).scale(8, 16.0) == 2.0
    assert jlora.AdapterConfig(rank=16, alpha=16, rslora=True).scale(16, 16.0) == 4.0
    assert jlora.AdapterConfig(method="gora", alpha=8).scale(16, 8.0) == 2.0


PARAMS = {
    "enc": {
        "q": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)},
        "v": {"kernel": jnp.ones((8, 6))},
        "mlp": {"kernel": jnp.ones((2, 8, 16))},
    },
    "emb": {"embedding": jnp.ones((5, 8))},
    "int": {"kernel": jnp.ones((4, 4), jnp.int32)},
}


def test_rules_first_match_wins_with_own_rank_and_alpha():
    cfg = jlora.AdapterConfig(
        method="lora", rank=2, alpha=4.0, targets=[(r"enc/q/kernel", 4, 8.0), r"enc/.*"]
    )
    _, ad = jlora.init(cfg, PARAMS, jax.random.key(0), layouts=jlora.stacked_layouts(PARAMS))
    assert list(ad) == ["enc/mlp/kernel", "enc/q/kernel", "enc/v/kernel"]
    assert ad["enc/q/kernel"].spec.rank == 4 and ad["enc/q/kernel"].spec.scale == 2.0
    assert ad["enc/v/kernel"].spec.rank == 2 and ad["enc/v/kernel"].spec.scale == 2.0
    assert ad["enc/mlp/kernel"].spec.stack == (2,)


def test_only_floating_kernels_are_candidates():
    rules = (jlora.Rule(pattern=".*"),)
    found = [t.path for t in targets.select(PARAMS, rules, 2, 1.0, jlora.stacked_layouts(PARAMS))]
    assert found == ["enc/mlp/kernel", "enc/q/kernel", "enc/v/kernel"]


def test_rule_matching_nothing_lists_closest_paths():
    cfg = jlora.AdapterConfig(targets=[r"enc/q/kernel", r"enc/query/kernel"])
    with pytest.raises(ValueError, match=r"'enc/query/kernel' matches no kernel.*enc/q/kernel"):
        jlora.init(cfg, PARAMS)


def test_rank_larger_than_kernel_fails():
    with pytest.raises(ValueError, match=r"rank 7 .*enc/v/kernel.* min\(d_in, d_out\) = 6"):
        jlora.init(jlora.AdapterConfig(rank=7, targets="enc/v/kernel"), PARAMS)


def test_stable_hash_is_the_same_in_another_process():
    code = "from jlora import targets; print(targets.stable_hash('a/b/kernel'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert int(out.stdout) == targets.stable_hash("a/b/kernel")
    assert 0 <= targets.stable_hash("x") < 2**31
