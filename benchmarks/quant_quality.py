"""`python -m benchmarks.quant_quality`: does training on a quantized base learn as well?

Two comparisons, each run with `train.py`'s loop (`jlora.train.loop.run`) in one process:

- `sst2`: MiniLM-L6 SST-2 with the shipped recipe `configs/sst2/lora.yaml` (300 steps), its
  base stored as fp32 (the recipe), bf16, int8 and NF4 (both from the bf16 base); reports the
  final dev accuracy and its difference to the bf16 base's.
- `gsm8k`: SmolLM2-135M LoRA on the shipped GSM8K sample (`configs/gsm8k/lora.yaml`, shortened:
  `--gsm8k-steps` steps of 4 sequences of ≤ 128 tokens, no evaluation), base bf16, NF4, and the
  GGUF's own Q4_1 blocks (`gguf`); reports the training loss curves (every step) and the mean of
  the last ten against bf16's.

Prints a Markdown table and writes `quant_quality.json` (with every curve) to `--out`.

  python -m benchmarks.quant_quality               # both (2 CPU cores: about 30 minutes)
  python -m benchmarks.quant_quality --tasks sst2
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

from benchmarks import common
from jlora.train import config as config_lib
from jlora.train import loop

log = logging.getLogger("benchmarks")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2_BASES = [("fp32", "float32", "none"), ("bf16", "bfloat16", "none"),
              ("int8", "bfloat16", "int8"), ("nf4", "bfloat16", "nf4")]  # fmt: skip
GSM8K_BASES = [("bf16", "bfloat16", "none"), ("nf4", "bfloat16", "nf4"),
               ("gguf", "bfloat16", "gguf")]  # fmt: skip


def _config(path: str, dtype: str, quantize: str, **overrides: Any) -> config_lib.RunConfig:
    raw = config_lib.to_dict(config_lib.load(ROOT / path))
    raw["model"].update(dtype=dtype, quantize=quantize)
    for section, values in overrides.items():
        raw[section].update(values)
    return config_lib.from_dict(raw)


def _losses(run: pathlib.Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def sst2(out: pathlib.Path) -> list[dict[str, Any]]:
    rows = []
    for label, dtype, quantize in SST2_BASES:
        cfg = _config("configs/sst2/lora.yaml", dtype, quantize)
        start = time.perf_counter()
        summary = loop.run(cfg, out / f"sst2-{label}", progress=False)
        rows.append(
            {
                "section": "quant-quality",
                "task": "sst2",
                "base": label,
                "accuracy": summary["eval/accuracy"],
                "seconds": time.perf_counter() - start,
            }
        )
    ref = next(r["accuracy"] for r in rows if r["base"] == "bf16")
    return [common.record({**r, "vs_bf16_points": 100 * (r["accuracy"] - ref)}) for r in rows]


def gsm8k(out: pathlib.Path, steps: int) -> list[dict[str, Any]]:
    rows = []
    for label, dtype, quantize in GSM8K_BASES:
        cfg = _config(
            "configs/gsm8k/lora.yaml",
            dtype,
            quantize,
            data={"max_length": 128, "buckets": [128], "max_eval_examples": 1, "max_new_tokens": 1},
            train={
                "steps": steps,
                "batch_size": 4,
                "grad_accum": 1,
                "eval_every": 0,
                "log_every": 1,
                "warmup_steps": 2,
            },
            checkpoint={"every": 0},
        )
        start = time.perf_counter()
        loop.run(cfg, out / f"gsm8k-{label}", progress=False)
        curve = _losses(out / f"gsm8k-{label}")
        rows.append(
            {
                "section": "quant-quality",
                "task": "gsm8k",
                "base": label,
                "first_loss": curve[0],
                "last10_loss": sum(curve[-10:]) / len(curve[-10:]),
                "curve": curve,
                "seconds": time.perf_counter() - start,
            }
        )
    ref = next(r["last10_loss"] for r in rows if r["base"] == "bf16")
    return [common.record({**r, "vs_bf16": r["last10_loss"] - ref}) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_quality", description=__doc__)
    p.add_argument("--tasks", default="sst2,gsm8k")
    p.add_argument("--gsm8k-steps", type=int, default=40)
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tasks = args.tasks.split(",")
    if set(tasks) - {"sst2", "gsm8k"}:
        p.error(f"--tasks {args.tasks!r}: expected some of sst2,gsm8k")
    if "sst2" in tasks:
        rows += sst2(out)
    if "gsm8k" in tasks:
        rows += gsm8k(out, args.gsm8k_steps)
    shown = [
        {
            "task": r["task"],
            "base": r["base"],
            "metric": f"acc {r['accuracy']:.4f}"
            if r["task"] == "sst2"
            else f"loss {r['first_loss']:.3f} → {r['last10_loss']:.3f}",
            "vs": f"{r['vs_bf16_points']:+.2f} pt"
            if r["task"] == "sst2"
            else f"{r['vs_bf16']:+.4f}",
            "seconds": f"{r['seconds']:.0f}",
        }
        for r in rows
    ]
    columns = [("task", "task"), ("base", "base"), ("metric", "result"), ("vs", "vs bf16"),
               ("seconds", "s")]  # fmt: skip
    print(common.table(shown, columns))
    result = {"environment": common.environment(), "rows": rows}
    (out / "quant_quality.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
