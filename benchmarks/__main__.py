"""`python -m benchmarks`: init cost, training-step cost and PEFT side by side.

Prints Markdown tables and the targets check, writes `results.json` and `results.png` to
`--out`. See BENCHMARKS.md for what each number means and the latest measured values.

  python -m benchmarks                      # everything (2 CPU cores: about 15 minutes)
  python -m benchmarks --smollm-layers 30   # the whole SmolLM2-135M depth on CPU too
  python -m benchmarks --sections step      # one section
  python -m benchmarks --sections step --workloads minilm   # one workload of it
  python -m benchmarks --quick              # small shapes and few rounds (a smoke test)
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

from benchmarks import common, init_cost, report, step_cost

log = logging.getLogger("benchmarks")

SECTIONS = ("init", "step", "peft")
WORKLOADS = ("minilm", "smollm2")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: init,step,peft")
    p.add_argument("--out", default="runs/benchmarks", help="folder for results.json / results.png")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="step section: comma-separated subset of minilm,smollm2",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="alternated rounds per step timing")
    p.add_argument(
        "--calls",
        type=int,
        default=None,
        help="back-to-back step calls per timed round (default: 1 on CPU, 10 on an accelerator)",
    )
    p.add_argument("--rank", type=int, default=16, help="adapter rank of the step benchmarks")
    p.add_argument("--nola-basis", type=int, default=128, help="NOLA k = l of the step benchmarks")
    p.add_argument(
        "--smollm-layers", type=int, default=None, help="decoder layers (default: 30; CPU: 10)"
    )
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; expected a comma-separated subset of {list(SECTIONS)}")
    args.sections = sections
    workloads = [s.strip() for s in args.workloads.split(",") if s.strip()]
    bad = [s for s in workloads if s not in WORKLOADS]
    if bad or not workloads:
        p.error(f"--workloads={args.workloads!r}: expected a comma-separated subset of {WORKLOADS}")
    args.workloads = workloads
    for flag in ("rounds", "calls"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag}={value}: expected an integer >= 1")
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    q = args.quick
    if "init" in args.sections:
        shapes = init_cost.SHAPES[:2] if q else init_cost.SHAPES
        ranks = (8,) if q else init_cost.RANKS
        per = init_cost.per_matrix(shapes=shapes, ranks=ranks, sketch_rounds=3 if q else 5)
        rows += per
        rows += init_cost.whole_minilm(
            rank=16, methods=("lora", "nlora", "pissa full SVD") if q else tuple(init_cost.METHODS)
        )
        rows += init_cost.whole_llama7b(
            rank=16,
            layers=2 if q else 32,
            slow_layers=1 if q else 2,
            methods=("nlora",) if q else ("nlora", "lora", "nlora random", "pissa rsvd niter 4"),
            per_matrix_rows=per,
        )
    if "step" in args.sections:
        rounds = args.rounds or (2 if q else 5)
        workloads = []
        if "minilm" in args.workloads:
            workloads.append(step_cost.minilm(batch=8 if q else 32, seq=32 if q else 64))
        # SmolLM2's 30 unrolled layers compile for ~25 s per step function on 2 CPU cores (NOLA
        # regenerating its bases: 140 s); the CPU default keeps 10 of them to stay in 15 minutes.
        cpu = jax.default_backend() == "cpu"
        if "smollm2" in args.workloads:
            layers = args.smollm_layers or (2 if q else 10 if cpu else None)
            workloads.append(
                step_cost.smollm2_shaped(batch=2 if q else 4, seq=64 if q else 256, layers=layers)
            )
        for w in workloads:
            for r in step_cost.run(
                w,
                rank=args.rank,
                nola_basis=16 if q else args.nola_basis,
                rounds=rounds if "MiniLM" in w.name else max(rounds - 2, 2),
                gora_batches=2,
                calls=args.calls or (1 if cpu else 10),
            ):
                rows.append(r)
    if "peft" in args.sections and jax.default_backend() != "cpu":
        log.warning(
            "--sections peft compares CPU steps with PyTorch's: skipped on %s "
            "(JAX_PLATFORMS=cpu python -m benchmarks --sections peft runs it on this host's CPU)",
            jax.default_backend(),
        )
    elif "peft" in args.sections:
        from benchmarks import peft_cost

        rows += peft_cost.run(rounds=args.rounds or (2 if q else 5))
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jlora").setLevel(logging.WARNING)
    args = _parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    common.record_to(out / "rows.jsonl")  # every row as it is measured, in case the run stops
    rows = run(args)
    result = {
        "environment": common.environment(),
        "arguments": {k: v for k, v in vars(args).items()},
        "wall_s": time.time() - start,
        "rows": rows,
        "targets": report.targets(rows),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    report.chart(rows, out / "results.png")
    print(report.text(rows))
    files = f"{out / 'results.json'} and {out / 'results.png'}"
    print(f"\n{len(rows)} rows in {result['wall_s']:.0f}s; wrote {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
