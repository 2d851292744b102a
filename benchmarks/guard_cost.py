"""`python -m benchmarks.guard_cost`: what the non-finite guard costs a training step.

Times the train loop's step with the guard (`jlora.train.steps.guarded_update`: finiteness of
the loss and every gradient leaf, `lax.cond` around the update) against the same step without
it, alternated round by round on one batch of a run config (default: the embedded default,
NLoRA r=16 on all of MiniLM-L6's linear layers). Prints a Markdown table and writes
`guard_cost.json` to `--out`.

  python -m benchmarks.guard_cost --rounds 30
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import optax

from benchmarks import common
from jlora.train import config as config_lib
from jlora.train import loop, steps
from jlora.train.setup import Setup


def step_pair(setup: Setup) -> tuple[dict, object, object, dict]:
    """`(state, guarded, plain, batch)`: jitted steps without donation, so they can repeat."""
    tx = setup.optimizer()
    state = setup.initial_state(tx)
    grad = jax.value_and_grad(loop._loss_of(setup))
    update = steps.guarded_update(tx, "stop")

    @jax.jit
    def guarded(state, frozen, batch):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"])
        return update(state, grads, loss)

    @jax.jit
    def plain(state, frozen, batch):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"])
        updates, opt = tx.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {**state, "trainable": trainable, "opt": opt, "step": state["step"] + 1}, loss

    batch = jax.tree.map(jax.numpy.asarray, next(iter(setup.data.train)))
    return state, guarded, plain, batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guard_cost")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    cfg = config_lib.load(args.config, args.overrides)
    setup = Setup(cfg, rows=None)
    state, guarded, plain, batch = step_pair(setup)
    frozen = setup.frozen
    times = common.alternate(
        {
            "guarded": lambda: guarded(state, frozen, batch),
            "plain": lambda: plain(state, frozen, batch),
        },
        rounds=args.rounds,
        warmup=2,
    )
    ratio = common.paired_ratio(times["guarded"], times["plain"])
    base = common.median(times["plain"])
    rows = [
        {"step": k, "median_s": f"{common.median(v):.4f}", "vs": f"{common.median(v) / base:.3f}"}
        for k, v in times.items()
    ]
    print(f"config {args.config} {args.overrides}, {args.rounds} alternated rounds")
    print(common.table(rows, [("step", "step"), ("median_s", "median s"), ("vs", "÷ plain")]))
    print(f"paired median ratio guarded / plain: {ratio:.3f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "overrides": args.overrides, "times": times, "ratio": ratio}
    (out / "guard_cost.json").write_text(json.dumps({**result, **common.environment()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
