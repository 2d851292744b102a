"""Shared fixtures: a small Linen transformer block and parameter pytrees with stacked kernels."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

# One persistent XLA compilation cache for every test process and the processes they start
# (train.py runs, multi-device and multi-host workers): most test time is compiling, and tests
# compile the same programs over and over (same tiny models, same methods). On 2 cores it cuts a
# cold run by a sixth and a warm one fivefold. JLORA_TEST_JAX_CACHE=0 turns it off; a
# JAX_COMPILATION_CACHE_DIR already set is kept. The folder is gitignored.
if os.environ.get("JLORA_TEST_JAX_CACHE", "1") != "0":
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU compiles with LLVM's optimizer off (jax_disable_most_optimizations): compiling is most
# of the suite's time, and this halves it on 2 cores; matmuls are library calls either way and
# floating-point semantics are unchanged (no fast-math either way). Tests that spend their time
# running real-size programs (training MiniLM or SmolLM2) are marked `optimized` and compile
# optimized. JLORA_TEST_FAST_COMPILE=0 optimizes everything.
FAST_COMPILE = os.environ.get("JLORA_TEST_FAST_COMPILE", "1") != "0"
if FAST_COMPILE:
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    # The `optimized` tests compile at LLVM's -O1 instead of XLA:CPU's default -O2: 20 % less
    # compile time, the same step times and results (SST-2 GoRA and E2E LoRA runs, 2026-12-05).
    # (The unoptimized compiles set their own level, 0.)
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=1".strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The same settings again, in case jax was imported (and read the environment) before this file.
if FAST_COMPILE:
    jax.config.update("jax_disable_most_optimizations", True)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optimized: compile optimized (the test runs real-size programs, see above)"
    )


# The longest tests (1.5-6 minutes each on 2 cores, 2026-12-05) start first: pytest-xdist hands
# tests out in collection order, and one of these collected last would keep one worker busy
# for minutes after the other ran out of tests. Order within each group is kept.
LONG_FIRST = (
    "tests/test_mesh_training.py::test_mesh_runs",
    "tests/test_configs_learn.py::test_e2e_config_learns",
    "tests/test_multihost.py::test_two_processes",
    "tests/test_guarantees.py::test_kills_at_random_points",
    "tests/test_benchmarks.py::test_quant_cost_rows",
    "tests/test_paper_configs.py::test_",
    "tests/test_configs_learn.py::test_sst2",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        starts = [i for i, p in enumerate(LONG_FIRST) if item.nodeid.startswith(p)]
        return starts[0] if starts else len(LONG_FIRST)

    items.sort(key=rank)  # stable


# Each test over LONG_TEST_S seconds is reported as it finishes, with the time of day: the
# --durations table is printed only when the whole run ends, and a CI run stopped at its time
# limit would otherwise leave no timings at all. JLORA_TEST_REPORT_OVER=0 reports every test.
LONG_TEST_S = float(os.environ.get("JLORA_TEST_REPORT_OVER", "30"))


def pytest_runtest_logreport(report):
    if report.when != "call" or report.duration < LONG_TEST_S:
        return
    print(
        f"\n[{time.strftime('%H:%M:%S')}] {report.duration:6.1f}s {report.nodeid}",
        flush=True,
    )


@contextlib.contextmanager
def optimized_compiles() -> Iterator[None]:
    """Optimized compiles inside the block, in this process and the processes it starts."""
    if not FAST_COMPILE:
        yield
        return
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _optimized_marker(request):
    if request.node.get_closest_marker("optimized"):
        with optimized_compiles():
            yield
    else:
        yield


@contextlib.contextmanager
def no_compilation_cache() -> Iterator[None]:
    """Compiles for real inside the block (for tests that count or time XLA compilations)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.reset_cache()


# Every method with the options that change its algorithm, as AdapterConfig keyword sets.
VARIANTS = {
    "lora": dict(method="lora"),
    "lora_gaussian_rs": dict(method="lora", lora_init="gaussian", rslora=True),
    "pissa": dict(method="pissa"),
    "pissa_rand": dict(method="pissa", pissa_niter=4),
    "slora": dict(method="slora"),
    "nlora": dict(method="nlora"),
    "nlora_pinv": dict(method="nlora", nlora_core="pinv"),
    "nlora_random": dict(method="nlora", nlora_core="pinv", nlora_sampling="random"),
    "inttune": dict(method="inttune"),
    "nola": dict(method="nola", nola_num_basis=(16, 12)),
    "nola_cache": dict(method="nola", nola_num_basis=(16, 12), nola_basis="cache"),
    "gora": dict(method="gora", gora_rank_range=(2, 8)),
}
# Variants whose output is unchanged at init: all but the paper-faithful nlora/inttune (which
# move by s·C·U·R) and gora (whose B init is one compressed gradient step).
EXACT_AT_INIT = [v for v in VARIANTS if v not in ("nlora", "inttune", "gora")]


class Block(nn.Module):
    """Pre-norm transformer block: 4-head attention (q, k, v, o) and an MLP 32 → 48 → 32."""

    d_model: int = 32
    heads: int = 4
    d_ff: int = 48

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(d, name=n)(h) for n in ("query", "key", "value"))
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // self.heads)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(o)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.DenseGeneral(self.d_ff, name="up")(h)
        return x + nn.Dense(d, use_bias=False, name="down")(jax.nn.gelu(h))


class Tiny(nn.Module):
    """Embedding → two blocks → vocabulary projection."""

    vocab: int = 40

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, 32, name="embed")(ids)
        for i in range(2):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


@pytest.fixture(scope="session")
def tiny():
    model = Tiny()
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)
    params = model.init(jax.random.key(0), ids)["params"]
    # Pretrained-like weights: larger than Flax's default init so adapters matter.
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 2 else p, params)
    return model, params, ids


@pytest.fixture(scope="session")
def stacked_params():
    """A plain pytree: a 2-D kernel with d_in != d_out and a (3, 24, 40) stacked kernel."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    return {
        "proj": {"kernel": jax.random.normal(k1, (24, 40)), "bias": jnp.zeros(40)},
        "layers": {"mlp": {"kernel": jax.random.normal(k2, (3, 40, 24))}},
        "embed": {"embedding": jax.random.normal(k3, (10, 24))},
    }


def make_config(variant: str, **overrides):
    import jlora

    kw = dict(VARIANTS[variant])
    kw.setdefault("rank", 4)
    kw.update(overrides)
    return jlora.AdapterConfig(**kw)


def fake_grads(params, seed: int = 3):
    """Random 'pre-pass gradients' for every kernel (GoRA's init only needs their values)."""
    from jlora import targets

    flat = {p: v for p, v in targets.flatten(params).items() if targets.is_kernel(p, v)}
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return {p: jax.random.normal(k, v.shape) for k, (p, v) in zip(keys, flat.items(), strict=True)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def init_variant(variant: str, params, key=0, **overrides):
    """`jlora.init` for a variant (GoRA gets `fake_grads`)."""
    import jlora

    cfg = make_config(variant, **overrides)
    grads = fake_grads(params) if cfg.method == "gora" else None
    layouts = jlora.stacked_layouts(params)  # the fixtures' 3-D kernels are stacked layers
    return jlora.init(cfg, params, jax.random.key(key), grads=grads, layouts=layouts)


# Tiny transformers configs of the PEFT parity tests (PyTorch twin of a jlora model).
HF_TINY = {
    "bert": dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=2,
    ),
    "llama": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    ),
}


def tiny_model(family: str):
    """The jlora model of `HF_TINY[family]` (`Bert` with a 2-label head, or `Llama`)."""
    if family == "bert":
        from jlora.models.bert import Bert, BertConfig

        return Bert(BertConfig(**HF_TINY["bert"]))
    from jlora.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig(**HF_TINY["llama"]))


def randomise_torch(torch, model, std: float = 0.1) -> None:
    """Pretrained-like magnitudes: every weight and bias non-trivial, norms near 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm.weight" in n or "norm.weight" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def hf_twin(family: str, **overrides):
    """`(torch, hf_config, transformers model, jlora model, jlora params)`: a tiny randomised
    `BertForSequenceClassification` or `LlamaForCausalLM` (`HF_TINY[family]` with `overrides`)
    and the jlora model with the same weights. Skips without torch or PEFT."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import transformers

    if family == "bert":
        from jlora.models.bert import Bert, config_from_hf, params_from_hf

        hf_cfg = transformers.BertConfig(**{**HF_TINY["bert"], **overrides})
        tm = transformers.BertForSequenceClassification(hf_cfg).eval()
        randomise_torch(torch, tm)
        sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        cfg = config_from_hf(hf_cfg.to_dict(), num_labels=hf_cfg.num_labels)
        return torch, hf_cfg, tm, Bert(cfg), params_from_hf(cfg, sd, sd.__getitem__)
    from jlora.models.llama import Llama
    from jlora.models.llama import params as lp

    hf_cfg = transformers.LlamaConfig(**{**HF_TINY["llama"], **overrides})
    hf_cfg._attn_implementation = "eager"
    tm = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomise_torch(torch, tm)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = lp.config_from_hf(hf_cfg.to_dict())
    return torch, hf_cfg, tm, Llama(cfg), lp.params_from_hf(cfg, sd, sd.__getitem__)


# Environment of the subprocesses that simulate 8 devices on the CPU.
# - XLA:CPU runs each device's share of a program on a pool of max(cores, devices) threads, and a
#   collective blocks its thread until every participant arrives. With two programs in flight
#   (asynchronous dispatch), the second one's participants can hold threads that the first
#   one's last participant needs: a deadlock (CI, 2026-12-03: "Expected 4 threads to join the
#   rendezvous, but only 3 of them arrived", after 1200 s). NPROC sizes the pools (32 threads;
#   xla/pjrt/utils DefaultThreadPoolSize), so that several programs' participants fit at once.
# - XLA:CPU aborts a process whose collective waits more than 40 s for a device thread; on a
#   2-core machine shared with another pytest worker that happened (CI, 2026-12-02), so the limit
#   is raised: a slow host is not a hang.
MULTIDEVICE_ENV = {
    **os.environ,
    "NPROC": "32",
    "XLA_FLAGS": " ".join(
        (
            os.environ.get("XLA_FLAGS", ""),
            "--xla_force_host_platform_device_count=8",
            "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
            "--xla_cpu_collective_timeout_seconds=1200",
        )
    ).strip(),
}


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 folder with a byte-level tokenizer (every byte a token, no merges;
    <|endoftext|> = 256), made offline with transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = transformers.GPT2Config(
        vocab_size=257, n_positions=256, n_embd=32, n_layer=2, n_head=4, bos_token_id=256,
        eos_token_id=256,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    # GPT-2's byte-to-character table (its tokenizer's `bytes_to_unicode`).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    vocab = {ch: b for b, ch in chars.items()}
    vocab["<|endoftext|>"] = 256
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=[])
    tok.save_pretrained(folder)
    return folder
