"""`python -m benchmarks.quant_init`: how far a quantized base with its adapters starts from the
full-precision model, per method: ‖K − (dequant(Q) + ΔK)‖ / ‖K‖ over the targets.

For each model (MiniLM-L6's and SmolLM2-135M's real weights; SmolLM2's "full precision" is its
GGUF's Q4_1 blocks dequantized, so a second quantization of already-quantized values), each
format (nf4, int8) and each init, `jlora.quant.loftq.init` initialises the all-linear adapters
(rank 16, alpha 32) from the full-precision kernels, quantizes the frozen base (a residual
method's `K − ΔK`), and runs `iters` LoftQ alternations where the method has free factors:

- `lora` with `iters=0` is plain quantization (ΔK = 0): the baseline of every row;
- `lora` with `iters` 1 and 5 is LoftQ; `pissa` with 0 is QPiSSA, with 5 QPiSSA + LoftQ;
- `nlora (pinv)` (Nyström with the residual written back), `loraga` and `gora` (their
  gradients from one batch of the workload's loss: `step_cost`), `dora` as they initialise.

`error` is the norm of the error of all targets together over the norm of their kernels
(√Σ‖K − K̂‖² / √Σ‖K‖²), `vs_plain` its ratio to plain quantization's, `median_target` the
median of the per-target relative errors. Prints a Markdown table, writes `quant_init.json`.

  python -m benchmarks.quant_init
  python -m benchmarks.quant_init --workloads smollm2 --formats nf4 --methods lora,pissa
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.models as jm
from benchmarks import common, quant_cost, step_cost
from jlora import quant

log = logging.getLogger("benchmarks")

RANK, ALPHA = 16, 32.0
# (row label, method, options, LoftQ iterations)
INITS = [
    ("lora (plain quantization)", "lora", {}, 0),
    ("lora + LoftQ 1", "lora", {}, 1),
    ("lora + LoftQ 5", "lora", {}, 5),
    ("pissa (QPiSSA)", "pissa", {}, 0),
    ("pissa + LoftQ 5", "pissa", {}, 5),
    ("nlora (pinv, residual)", "nlora", {"nlora_core": "pinv"}, 0),
    ("loraga", "loraga", {}, 0),
    ("gora", "gora", {"gora_rank_range": (4, 32)}, 0),
    ("dora", "dora", {}, 0),
]


def errors(
    w: step_cost.Workload, fmt: str, inits: list[tuple[str, str, dict, int]]
) -> list[dict[str, Any]]:
    """One row per init of one workload and format."""
    targets = jm.preset(w.model, "all-linear")
    params = jax.tree.map(lambda x: x.astype(jnp.float32), w.params)
    grads_cache: dict[str, Any] = {}
    rows, plain = [], None
    for label, method, options, iters in inits:
        cfg = jlora.AdapterConfig(method=method, rank=RANK, alpha=ALPHA, targets=targets, **options)
        grads = None
        if jlora.methods.METHODS[method].needs_grads:
            if method not in grads_cache:

                def loss(p, b):
                    return w.loss(w.apply(p, b), b)

                grads_cache[method] = jlora.gradient_stats(loss, params, [w.batch], cfg)
            grads = grads_cache[method]
        start = time.perf_counter()
        base, adapters = quant.loftq.init(cfg, params, 0, fmt=fmt, iters=iters, grads=grads)
        seconds = time.perf_counter() - start
        merged = jlora.targets.flatten(jlora.merge(base, adapters))
        flat = jlora.targets.flatten(params)
        num = den = 0.0
        per_target = []
        for p in adapters:
            k = np.asarray(flat[p], np.float64)
            e = float(np.sum((k - np.asarray(merged[p], np.float64)) ** 2))
            num, den = num + e, den + float(np.sum(k**2))
            per_target.append(np.sqrt(e / np.sum(k**2)))
        err = float(np.sqrt(num / den))
        plain = err if plain is None else plain
        rows.append(
            common.record(
                {
                    "section": "quant-init",
                    "workload": w.name,
                    "format": fmt,
                    "init": label,
                    "method": method,
                    "iters": iters,
                    "targets": len(adapters),
                    "error": err,
                    "vs_plain": err / plain,
                    "median_target": float(np.median(per_target)),
                    "seconds": seconds,
                }
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_init", description=__doc__)
    p.add_argument("--workloads", default="minilm,smollm2", help="comma-separated subset")
    p.add_argument("--formats", default="nf4,int8")
    p.add_argument("--smollm-layers", type=int, default=30)
    methods = sorted({m for _, m, _, _ in INITS})
    p.add_argument(
        "--methods",
        default=",".join(methods),
        help=f"comma-separated subset of the inits' methods ({','.join(methods)})",
    )
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    chosen = args.methods.split(",")
    if unknown := [m for m in chosen if m not in methods]:
        p.error(f"--methods: unknown {unknown}; expected some of {methods}")
    inits = [i for i in INITS if i[1] in chosen]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workloads = []
    for name in args.workloads.split(","):
        if name == "minilm":
            workloads.append(step_cost.minilm(batch=8, seq=64))
        elif name == "smollm2":
            workloads.append(quant_cost.smollm2(args.smollm_layers, batch=2, seq=64)[0])
        else:
            p.error(f"--workloads: unknown {name!r}; expected minilm,smollm2")
    rows = []
    for w in workloads:
        for fmt in args.formats.split(","):
            if fmt not in quant.FORMATS:
                p.error(f"--formats: unknown {fmt!r}; expected some of {quant.FORMATS}")
            rows += errors(w, fmt, inits)
    shown = [
        {
            **r,
            "error": f"{r['error']:.4f}",
            "vs_plain": f"{r['vs_plain']:.3f}",
            "median_target": f"{r['median_target']:.4f}",
        }
        for r in rows
    ]
    columns = [
        ("workload", "model"),
        ("format", "format"),
        ("init", "init"),
        ("error", "‖K−K̂‖/‖K‖"),
        ("vs_plain", "vs plain"),
        ("median_target", "median target"),
    ]
    print(common.table(shown, columns))
    result = {"environment": common.environment(), "rows": rows}
    (out / "quant_init.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
