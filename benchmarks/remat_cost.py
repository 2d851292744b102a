"""`python -m benchmarks.remat_cost`: what per-layer rematerialisation saves and costs.

One workload (default: a SmolLM2-135M-shaped decoder with random weights, 10 of its 30 layers
on CPU, batch 4 × 256 tokens, causal-LM loss), one adapter step per (method, remat policy):
`step_cost.AdapterStep` (split, inject inside value_and_grad, Adam, state donated) with the
model's `remat` set to `none`, `full` or `dots` (`jlora.models.remat`). For each it reports the
median step time, the paired ratio to the same method without remat (alternated round by round
on one machine), XLA's temporaries and peak (`common.xla_memory`) and their ratio to no remat.
Prints a Markdown table and writes `remat_cost.json` to `--out`.

  python -m benchmarks.remat_cost --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any

from benchmarks import common, step_cost
from jlora.models.remat import REMAT

log = logging.getLogger("benchmarks")


def rows(
    w: step_cost.Workload, *, methods: tuple[str, ...], rank: int, rounds: int
) -> list[dict[str, Any]]:
    """One row per (method, remat): time, paired ratio and XLA memory against no remat."""
    out = []
    for method in methods:
        v = step_cost.Variant(name=method, method=method)
        steps = {}
        for policy in REMAT:
            wp = dataclasses.replace(w, model=w.model.clone(remat=policy))
            steps[policy] = step_cost.AdapterStep(wp, v, step_cost.adapter_config(wp, v, rank))
        memory = {p: fn.memory() for p, fn in steps.items()}
        compile_s = {p: common.seconds(fn) for p, fn in steps.items()}
        losses = {p: float(fn()) for p, fn in steps.items()}
        times = common.alternate(steps, rounds=rounds, warmup=1)
        for policy in REMAT:
            out.append(
                {
                    "workload": w.name,
                    "method": method,
                    "remat": policy,
                    "median_s": common.median(times[policy]),
                    "times_s": times[policy],
                    "vs_none": common.paired_ratio(times[policy], times["none"]),
                    "compile_s": compile_s[policy],
                    "memory": memory[policy],
                    "temporaries_vs_none": memory[policy]["temporaries"]
                    / memory["none"]["temporaries"],
                    "peak_vs_none": memory[policy]["peak"] / memory["none"]["peak"],
                    # Remat recomputes, it does not change the numbers: same loss as no remat.
                    "loss_diff": abs(losses[policy] - losses["none"]),
                }
            )
            log.info("  %s / %s: %s", method, policy, common.fmt_s(out[-1]["median_s"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.remat_cost")
    p.add_argument("--methods", default="lora,nlora", help="comma-separated adapter methods")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=10, help="decoder layers of the 30")
    p.add_argument("--rounds", type=int, default=10, help="alternated rounds of the steps")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    w = step_cost.smollm2_shaped(batch=args.batch, seq=args.seq, layers=args.layers)
    methods = tuple(m for m in args.methods.split(",") if m)
    result_rows = rows(w, methods=methods, rank=args.rank, rounds=args.rounds)
    print(f"{w.name}, rank {args.rank}, all-linear, {args.rounds} alternated rounds")
    table = [
        {
            "method": r["method"],
            "remat": r["remat"],
            "median": common.fmt_s(r["median_s"]),
            "vs_none": f"{r['vs_none']:.3f}",
            "temp": common.fmt_bytes(r["memory"]["temporaries"]),
            "temp_ratio": f"{r['temporaries_vs_none']:.3f}",
            "peak": common.fmt_bytes(r["memory"]["peak"]),
            "peak_ratio": f"{r['peak_vs_none']:.3f}",
        }
        for r in result_rows
    ]
    columns = [
        ("method", "method"),
        ("remat", "remat"),
        ("median", "step (median)"),
        ("vs_none", "÷ none (paired)"),
        ("temp", "XLA temporaries"),
        ("temp_ratio", "÷ none"),
        ("peak", "XLA peak"),
        ("peak_ratio", "÷ none"),
    ]
    print(common.table(table, columns))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "rows": result_rows, **common.environment()}
    (out / "remat_cost.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
