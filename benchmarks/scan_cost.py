"""`python -m benchmarks.scan_cost`: compile time and step time of scanned vs unrolled layers.

The SmolLM2-135M shape (30 layers, random weights, batch 2 × 128 tokens, causal-LM loss), one
adapter step per (method, layout): `step_cost.AdapterStep` (split, the factored path inside
value_and_grad, Adam, state donated) on `Llama(scan_layers=False)` (30 layers unrolled in the
program) and `Llama(scan_layers=True)` (`nn.scan`: one layer compiled, parameters stacked; the
adapters travel in the layers' parameters, `jlora.linen.attach`). For each it reports the time
of the first call (trace + compile + one step), the median step time over alternated rounds and
its paired ratio to unrolled, and the loss difference (the same function: ≤ 1e-4).
Prints a Markdown table and writes `scan_cost.json` to `--out`.

  python -m benchmarks.scan_cost --methods lora,nola --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any

from benchmarks import common, step_cost
from jlora.models.scan import stack_layers

log = logging.getLogger("benchmarks")

LAYOUTS = ("unrolled", "scanned")


def rows(
    methods: tuple[str, ...], *, rank: int, rounds: int, batch: int, seq: int, layers: int | None
) -> tuple[str, list[dict[str, Any]]]:
    """One row per (method, layout)."""
    unrolled = step_cost.smollm2_shaped(batch=batch, seq=seq, layers=layers)
    scanned = step_cost.smollm2_shaped(batch=batch, seq=seq, layers=layers, scan=True)
    # The same weights in both layouts.
    scanned = dataclasses.replace(scanned, params=stack_layers(unrolled.params))
    work = {"unrolled": unrolled, "scanned": scanned}
    out = []
    for method in methods:
        v = step_cost.Variant(name=method, method=method)
        steps, first_s, losses = {}, {}, {}
        for name, w in work.items():
            steps[name] = step_cost.AdapterStep(w, v, step_cost.adapter_config(w, v, rank))
            t0 = time.perf_counter()
            losses[name] = float(steps[name]())
            first_s[name] = time.perf_counter() - t0
            log.info("  %s / %s: first call %.1fs", method, name, first_s[name])
        times = common.alternate(steps, rounds=rounds, warmup=1)
        for name in LAYOUTS:
            out.append(
                {
                    "method": method,
                    "layers": name,
                    "first_call_s": first_s[name],
                    "median_s": common.median(times[name]),
                    "times_s": times[name],
                    "vs_unrolled": common.paired_ratio(times[name], times["unrolled"]),
                    "loss_diff": abs(losses[name] - losses["unrolled"]),
                }
            )
    return unrolled.name, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scan_cost")
    p.add_argument("--methods", default="lora,nola", help="comma-separated adapter methods")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 30)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds of the steps")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = tuple(m for m in args.methods.split(",") if m)
    name, result_rows = rows(
        methods,
        rank=args.rank,
        rounds=args.rounds,
        batch=args.batch,
        seq=args.seq,
        layers=args.layers,
    )
    print(f"{name}, rank {args.rank}, all-linear, factored path, {args.rounds} alternated rounds")
    table = [
        {
            "method": r["method"],
            "layers": r["layers"],
            "first": f"{r['first_call_s']:.1f} s",
            "median": common.fmt_s(r["median_s"]),
            "ratio": f"{r['vs_unrolled']:.3f}",
            "loss_diff": f"{r['loss_diff']:.1e}",
        }
        for r in result_rows
    ]
    columns = [
        ("method", "method"),
        ("layers", "layers"),
        ("first", "first call (compile)"),
        ("median", "step (median)"),
        ("ratio", "÷ unrolled (paired)"),
        ("loss_diff", "|Δ loss|"),
    ]
    print(common.table(table, columns))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "rows": result_rows, **common.environment()}
    (out / "scan_cost.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
