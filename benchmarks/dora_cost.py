"""`python -m benchmarks.dora_cost`: what a DoRA training step costs next to LoRA's.

The steps are `step_cost.AdapterStep`, the real thing: `jlora.split`, `jlora.inject` (or
`jlora.merge`) inside `value_and_grad`, `jlora.optimizer(adam)`, the state donated. They run on
one workload (default: MiniLM-L6 with its real weights and a 2-label head, batch 32 × 64
tokens, every linear layer adapted at rank 16, alpha 32), alternated round by round:

- `lora` and `dora` on the factored path (the ratio dora / lora is the headline);
- `dora, norm without A@B`: DoRA with ‖K + s·A@B‖_c computed from `AᵀK`, `AᵀA` and B
  (`column_norm_unformed`) instead of from the formed `K + s·A@B` (`column_norm`, DoRA's
  default);
- `lora (merged)` and `dora (merged)`: the merged path.

Then the two column-norm computations alone, on MiniLM's kernel shapes (jitted, alternated).
Prints Markdown tables and writes `dora_cost.json` to `--out`.

  python -m benchmarks.dora_cost --rounds 20
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora.methods.dora as dora_lib
from benchmarks import common, step_cost
from jlora import linalg
from jlora.methods import METHODS, register

log = logging.getLogger("benchmarks")

# MiniLM-L6's kernel shapes (d_in, d_out): q/k/v/o, the MLP's up and down projections.
MINILM_SHAPES = ((384, 384), (384, 1536), (1536, 384))
UNFORMED = "dora_unformed"


def column_norm_unformed(K: jax.Array, A: jax.Array, B: jax.Array, s: Any) -> jax.Array:
    """`‖K + s·A@B‖_c` without forming `A@B` (2-D K (d_in, d_out), A (d_in, r), B (r, d_out)):
    `‖K_j + s(AB)_j‖² = ‖K_j‖² + s·Σ_r B_rj·(2·AᵀK + s·AᵀA@B)_rj`. The only large product is
    `AᵀK` (d_in·d_out·r flops, as `A@B`) and no (d_in, d_out) temporary is written.

    (`Kᵀ@A` instead of `Aᵀ@K` measured 2–5.5× slower on CPU: a transposed copy of K.)
    """
    C = 2.0 * linalg.mm(A.T, K) + s * linalg.mm(linalg.mm(A.T, A), B)  # (r, d_out)
    sq = jnp.sum(K * K, axis=0) + s * jnp.sum(B * C, axis=0)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


class DoraUnformedNorm(dora_lib.Dora):
    """DoRA whose factored path uses `column_norm_unformed` (for timing only)."""

    name = UNFORMED
    norm = staticmethod(column_norm_unformed)


def variants() -> list[step_cost.Variant]:
    V = step_cost.Variant
    return [
        V(name="lora", method="lora"),
        V(name="dora", method="dora"),
        V(name="dora, norm without A@B", method=UNFORMED),
        V(name="lora (merged)", method="lora", path="merge"),
        V(name="dora (merged)", method="dora", path="merge"),
    ]


def step_rows(w: step_cost.Workload, *, rank: int, rounds: int) -> list[dict[str, Any]]:
    """One row per variant: median step time and paired ratios to LoRA's factored step."""
    registered = UNFORMED not in METHODS
    if registered:
        register(DoraUnformedNorm())
    try:
        steps = {}
        for v in variants():
            steps[v.name] = step_cost.AdapterStep(w, v, step_cost.adapter_config(w, v, rank))
            log.info("  built %s", v.name)
        compile_s = {name: common.seconds(fn) for name, fn in steps.items()}  # compiles
        times = common.alternate(steps, rounds=rounds, warmup=1)
    finally:
        if registered:
            METHODS.unregister(UNFORMED)
    rows = []
    for name, fn in steps.items():
        rows.append(
            {
                "workload": w.name,
                "variant": name,
                "median_s": common.median(times[name]),
                "times_s": times[name],
                "vs_lora": common.paired_ratio(times[name], times["lora"]),
                "vs_lora_merged": common.paired_ratio(times[name], times["lora (merged)"]),
                "compile_s": compile_s[name],
                "trainable": fn.trainable_count,
                "memory": fn.memory(),
            }
        )
    return rows


def norm_rows(
    shapes: tuple[tuple[int, int], ...], rank: int, rounds: int, calls: int = 20
) -> list[dict[str, Any]]:
    """DoRA's `column_norm` (forming `K + s·A@B`) against `column_norm_unformed`, jitted, per
    kernel shape, with their largest relative error against float64."""
    rows = []
    for d_in, d_out in shapes:
        rng = np.random.default_rng(0)
        K = rng.standard_normal((d_in, d_out)).astype(np.float32)
        A = (rng.standard_normal((d_in, rank)) / d_in**0.5).astype(np.float32)
        B = rng.standard_normal((rank, d_out)).astype(np.float32)
        fns = {
            "formed": common.Call(jax.jit(dora_lib.column_norm), K, A, B, 2.0),
            "without A@B": common.Call(jax.jit(column_norm_unformed), K, A, B, 2.0),
        }
        want = np.linalg.norm(K.astype(np.float64) + 2.0 * A.astype(np.float64) @ B, axis=0)
        err = {n: float(np.max(np.abs(np.asarray(fn()) / want - 1))) for n, fn in fns.items()}
        times = common.alternate(fns, rounds=rounds, warmup=2, calls=calls)
        rows.append(
            {
                "shape": f"{d_in}x{d_out}",
                "rank": rank,
                "formed_s": common.median(times["formed"]),
                "without_s": common.median(times["without A@B"]),
                "ratio": common.paired_ratio(times["without A@B"], times["formed"]),
                "max_rel_err": err,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dora_cost")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20, help="alternated rounds of the steps")
    p.add_argument("--norm-rounds", type=int, default=30, help="rounds of the norm timings")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    w = step_cost.minilm(batch=args.batch, seq=args.seq)
    steps = step_rows(w, rank=args.rank, rounds=args.rounds)
    norms = norm_rows(MINILM_SHAPES, args.rank, args.norm_rounds)
    print(f"{w.name}, rank {args.rank}, all-linear, {args.rounds} alternated rounds")
    table = [
        {
            "variant": r["variant"],
            "median": common.fmt_s(r["median_s"]),
            "vs_lora": f"{r['vs_lora']:.3f}",
            "compile": f"{r['compile_s']:.1f} s",
            "peak": common.fmt_bytes(r["memory"]["peak"]),
        }
        for r in steps
    ]
    columns = [
        ("variant", "step"),
        ("median", "median"),
        ("vs_lora", "÷ lora (paired)"),
        ("compile", "first call"),
        ("peak", "XLA peak"),
    ]
    print(common.table(table, columns))
    by = {r["variant"]: r for r in steps}
    print(f"paired median ratio dora / lora: {by['dora']['vs_lora']:.3f}")
    print(f"\nDoRA's column norm ‖K + s·A@B‖_c at rank {args.rank}, {args.norm_rounds} rounds")
    norm_table = [
        {
            "shape": r["shape"],
            "formed": common.fmt_s(r["formed_s"]),
            "without": common.fmt_s(r["without_s"]),
            "ratio": f"{r['ratio']:.3f}",
        }
        for r in norms
    ]
    print(
        common.table(
            norm_table,
            [
                ("shape", "d_in × d_out"),
                ("formed", "forming K + s·A@B (dora)"),
                ("without", "without A@B"),
                ("ratio", "without ÷ formed (paired)"),
            ],
        )
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args),
        "steps": steps,
        "norms": norms,
        "ratio": by["dora"]["vs_lora"],
        **common.environment(),
    }
    (out / "dora_cost.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
