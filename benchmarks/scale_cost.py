"""`python -m benchmarks.scale_cost`: adapter steps at the papers' model sizes on one device.

Llama-3.2-1B- and Llama-3.1-8B-shaped decoders (their hub configs, shipped in
`jlora/models/known/`) with random bf16 weights, `model.remat` full, one fixed batch of
`--batch` × `--seq` tokens and a causal-LM loss. For each model it compiles and times the
frozen-base floor (`step_cost.floor_step`: forward and backward to the embeddings, no weight
gradient) and one real training step per method (`step_cost.AdapterStep`: split, inject inside
`value_and_grad`, Adam, donated state), alternated round by round, and reports:

- tokens/s of the step (batch × seq / median step time) and its compile time;
- MFU: model FLOPs per step / (median time × the device's bf16 dense peak). Model FLOPs count
  what a frozen-base adapter step must do: 4 · N per token for the matmuls (forward, and the
  backward to their inputs; no weight gradient), N being the layers' and the LM head's matmul
  parameters, plus 12 · layers · seq · hidden per token for attention scores and values
  (forward and backward, causal masking not subtracted). Remat's recomputation is not counted
  (MFU, not hardware FLOPs utilisation). The peak comes from `--peak-tflops` or the device
  kind (H100/H200 989, A100 312, L4 121 TFLOP/s); on a CPU there is none and MFU is left out;
- the step / floor ratio (paired per round).

`--quantize none,nf4` also runs each method on the base kept as NF4 (or int8, ...; each layer
dequantizes to bf16), with XLA's peak of every step: QLoRA's memory against the bf16 base.

Prints a Markdown table and writes `scale_cost.json` (rows also to `rows.jsonl` as they come)
to `--out`. On one 80 GB GPU:

  python -m benchmarks.scale_cost --models 1b,8b --methods lora,nlora --seq 1024 --rounds 5
  python -m benchmarks.scale_cost --models 8b --methods lora --quantize none,nf4 --seq 1024

On a CPU, `--layers 1 --seq 64` runs the same code on one layer of each shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, step_cost
from jlora import quant
from jlora.models.abstract import load_abstract

log = logging.getLogger("benchmarks")

MODELS = {"1b": "meta-llama/Llama-3.2-1B", "8b": "meta-llama/Llama-3.1-8B"}
# Dense bf16 peak, TFLOP/s, by a substring of `device.device_kind` (first match wins).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_flops(device: Any, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (`override` in TFLOP/s wins), or None."""
    if override is not None:
        return override * 1e12
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def model_flops(config: Any, batch: int, seq: int) -> float:
    """Model FLOPs of one frozen-base adapter step (see the module docstring)."""
    d, f, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * f  # q,o + k,v + mlp
    matmul_params = n_layers * per_layer + d * config.vocab_size  # + the LM head
    tokens = batch * seq
    return 4.0 * matmul_params * tokens + 12.0 * n_layers * seq * d * tokens


def workload(
    size: str, *, batch: int, seq: int, layers: int | None, remat: str
) -> tuple[step_cost.Workload, Any]:
    """`(workload, model config)` of the `size` model's shape: random bf16 weights (N(0, 0.02);
    norms 1), drawn on the device in one program: an 8B model is never in fp32 at once."""
    model, shapes = load_abstract(MODELS[size], dtype=jnp.bfloat16)
    config = model.config
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
        model = type(model)(config, jnp.bfloat16)
        ids = jnp.ones((1, 8), jnp.int32)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids)["params"])
    model = model.clone(remat=remat)
    leaves, tree = jax.tree.flatten(shapes)

    @jax.jit
    def draw(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, len(leaves))
        return [
            (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(jnp.bfloat16)
            if len(s.shape) > 1
            else jnp.ones(s.shape, jnp.bfloat16)  # norms
            for k, s in zip(keys, leaves, strict=True)
        ]

    params = tree.unflatten(draw(jax.random.key(0)))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(100, config.vocab_size, (batch, seq)), jnp.int32)
    name = MODELS[size].split("/")[1]
    depth = "" if layers is None else f", {layers} layer(s)"
    name = f"{name}-shaped{depth} (b={batch}, t={seq}, bf16, remat {remat})"
    return step_cost.causal_lm(name, model, params, ids), config


def _quantized(w: step_cost.Workload, fmt: str) -> step_cost.Workload:
    """`w` with its dense kernels kept as `fmt` (`jlora.quant`; dequantized to bf16 in each
    layer, QLoRA-style), quantized on the device one kernel at a time."""
    params = quant.quantize_params(w.params, fmt, quant.FROZEN_KERNELS)
    return dataclasses.replace(w, params=params, name=f"{w.name}, {fmt} base")


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    device = jax.devices()[0]
    peak = peak_flops(device, args.peak_tflops)
    for size in [s for s in args.models.split(",") if s]:
        w, config = workload(
            size, batch=args.batch, seq=args.seq, layers=args.layers, remat=args.remat
        )
        flops = model_flops(config, args.batch, args.seq)
        steps: dict[str, Any] = {"floor": step_cost.floor_step(w)}
        memory: dict[str, int] = {}
        for fmt in [f for f in args.quantize.split(",") if f]:
            wq = w if fmt == "none" else _quantized(w, fmt)
            for method in [m for m in args.methods.split(",") if m]:
                v = step_cost.Variant(name=method, method=method)
                name = method if fmt == "none" else f"{method} @ {fmt}"
                steps[name] = step_cost.AdapterStep(
                    wq, v, step_cost.adapter_config(wq, v, args.rank)
                )
                memory[name] = steps[name].memory()["peak"]
        compile_s = {}
        for name, fn in steps.items():
            before = common.compilations()
            compile_s[name] = common.seconds(fn)
            log.info(
                "  %s %s: compiled in %.1fs (%d programs)",
                w.name,
                name,
                compile_s[name],
                common.compilations() - before,
            )
        times = common.alternate(steps, rounds=args.rounds, warmup=1, calls=args.calls)
        for name in steps:
            median = common.median(times[name])
            row = {
                "workload": w.name,
                "step": name,
                "median_s": median,
                "times_s": times[name],
                "compile_s": compile_s[name],
                "tokens_per_s": args.batch * args.seq / median,
                "model_flops": flops,
                "mfu": None if peak is None else flops / (median * peak),
                "vs_floor": common.paired_ratio(times[name], times["floor"]),
                "xla_peak": memory.get(name),
                "device": getattr(device, "device_kind", device.platform),
            }
            out.append(common.record(row))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_cost")
    p.add_argument("--models", default="1b,8b", help=f"comma-separated of {sorted(MODELS)}")
    p.add_argument("--methods", default="lora,nlora", help="comma-separated adapter methods")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--quantize",
        default="none",
        help="comma-separated base storages for the method steps: none (bf16), nf4, int8, ...",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds of the steps")
    p.add_argument("--calls", type=int, default=1, help="back-to-back calls timed together")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m and m not in MODELS]
    if bad:
        p.error(f"--models {args.models!r}: unknown {bad}; expected some of {sorted(MODELS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.record_to(out / "rows.jsonl")
    result_rows = rows(args)
    table = [
        {
            "workload": r["workload"],
            "step": r["step"],
            "median": common.fmt_s(r["median_s"]),
            "tokens": f"{r['tokens_per_s']:,.0f}",
            "mfu": "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "floor": f"{r['vs_floor']:.2f}×",
            "compile": f"{r['compile_s']:.1f} s",
            "peak": "—" if r["xla_peak"] is None else common.fmt_bytes(r["xla_peak"]),
        }
        for r in result_rows
    ]
    columns = [
        ("workload", "workload"),
        ("step", "step"),
        ("median", "step (median)"),
        ("tokens", "tokens/s"),
        ("mfu", "MFU"),
        ("floor", "÷ floor (paired)"),
        ("compile", "first call (compiles)"),
        ("peak", "XLA peak"),
    ]
    print(common.table(table, columns))
    result = {"args": vars(args), "rows": result_rows, **common.environment()}
    (out / "scale_cost.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
