"""The jitted training steps, and the guard that keeps non-finite steps out of the state.

Every step checks, inside the jitted program, that the loss and the gradients' global norm
are finite (a NaN/Inf in any leaf makes the norm non-finite; it is the norm the metrics and
clipping use). A step that is not is never applied: `lax.cond` keeps the trainable leaves and
the optimizer state as they were. The state's `guard` counters record it (`skipped`, the
1-based `first_bad` step and the index of its first non-finite gradient leaf, -1 when only the
loss was, or the norm overflowed). The host reads them only where it syncs anyway (log points,
evaluations, checkpoints): `check` raises `NonFiniteError` under the `stop` policy, or once
more than `train.max_skipped_steps` steps were dropped under `skip`. Under `stop`, every step
after the first bad one is dropped too, so the state the run ends with is the last good one.

Example:
  >>> import jax.numpy as jnp, optax
  >>> tx = optax.sgd(0.1)
  >>> update = guarded_update(tx, "skip")
  >>> state = {"trainable": {"w": jnp.ones(2)}, "opt": tx.init({"w": jnp.ones(2)}),
  ...          "step": jnp.int32(0), "guard": new_guard()}
  >>> state, _ = update(state, {"w": jnp.array([1.0, jnp.nan])}, jnp.float32(0.5))
  >>> state["trainable"]["w"].tolist(), int(state["guard"]["skipped"]), int(state["step"])
  ([1.0, 1.0], 1, 1)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.errors import UserError
from jlora.train.checkpoint import shapes
from jlora.train.distributed import to_host

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A step's loss or gradient was NaN/Inf (and the policy says stop)."""


def new_guard() -> dict[str, jax.Array]:
    return {
        "skipped": jnp.zeros((), jnp.int32),
        "first_bad": jnp.full((), -1, jnp.int32),
        "bad_leaf": jnp.full((), -1, jnp.int32),
    }


def guarded_update(
    tx: optax.GradientTransformation, policy: str
) -> Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """`update(state, grads, loss) -> (state, metrics)` applying `tx` only to a finite step."""

    def update(state: Any, grads: Any, loss: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        # One reduction decides: a NaN/Inf anywhere makes the global norm non-finite. The
        # per-leaf scan that names the culprit runs only on the (rare) dropped branch.
        norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(norm)
        guard = state["guard"]
        apply = ok & (guard["first_bad"] < 0) if policy == "stop" else ok

        def step(s: Any) -> tuple[Any, Any, jax.Array]:
            updates, opt = tx.update(grads, s["opt"], s["trainable"])
            return optax.apply_updates(s["trainable"], updates), opt, jnp.int32(-1)

        def keep(s: Any) -> tuple[Any, Any, jax.Array]:
            leaves = jax.tree.leaves(grads)
            leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves] or [jnp.bool_(True)])
            bad = jnp.where(jnp.all(leaf_ok), -1, jnp.argmin(leaf_ok)).astype(jnp.int32)
            return s["trainable"], s["opt"], bad

        trainable, opt, bad_leaf = jax.lax.cond(apply, step, keep, state)
        first = ~ok & (guard["first_bad"] < 0)
        guard = {
            "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
            "first_bad": jnp.where(first, state["step"] + 1, guard["first_bad"]),
            "bad_leaf": jnp.where(first, bad_leaf, guard["bad_leaf"]),
        }
        new = {"trainable": trainable, "opt": opt, "step": state["step"] + 1, "guard": guard}
        return new, {"loss": loss, "grad_norm": norm}

    return update


def step_fns(
    loss_of: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    policy: str,
    state_shardings: Any = None,
    replicated: Any = None,
) -> tuple[Any, Any, Any]:
    """`(fused, accumulate, apply)`, jitted with the state donated.

    `loss_of(trainable, frozen, batch, step_or_micro_key)`; `fused(state, frozen, batch)` is one
    optimizer step; with gradient accumulation, `accumulate(acc, state, frozen, batch, micro)`
    sums micro-batch gradients and `apply(state, acc, n)` averages and applies them.

    With `state_shardings` (the state's layouts on a mesh) and `replicated` (the mesh's
    replicated sharding), every step returns the state in its own layout (so donation reuses
    its buffers and no step reshards it) and the metrics replicated.
    """
    grad = jax.value_and_grad(loss_of)
    update = guarded_update(tx, policy)
    if state_shardings is None:
        step_out = acc_out = None
    else:
        step_out = (state_shardings, replicated)
        acc_out = (state_shardings["trainable"], replicated)
    jit = functools.partial(jax.jit, donate_argnums=(0,))

    @functools.partial(jit, out_shardings=step_out)
    def fused(state, frozen, batch):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"])
        return update(state, grads, loss)

    @functools.partial(jit, out_shardings=acc_out)
    def accumulate(acc, state, frozen, batch, micro):
        loss, grads = grad(state["trainable"], frozen, batch, state["step"] * 1000 + micro)
        return jax.tree.map(jnp.add, acc, (grads, loss))

    @functools.partial(jit, out_shardings=step_out)
    def apply(state, acc, n):
        grads, loss = jax.tree.map(lambda x: x / n, acc)
        return update(state, grads, loss)

    return fused, accumulate, apply


class Guard:
    """Host-side reading of the state's guard counters at the points the loop syncs anyway."""

    def __init__(self, trainable: Any, policy: str, max_skipped: int) -> None:
        self.leaf_names = list(shapes(trainable))
        self.policy = policy
        self.max_skipped = max_skipped
        self.seen_skipped = 0

    def describe(self, guard: dict[str, Any]) -> str:
        first, leaf = int(guard["first_bad"]), int(guard["bad_leaf"])
        what = (
            f"first non-finite gradient: {self.leaf_names[leaf]}"
            if leaf >= 0
            else "the loss, or a gradient norm beyond float range"
        )
        return f"step {first} had a non-finite loss or gradient ({what})"

    def check(self, state: Any, last_checkpoint: int | None) -> int:
        """The number of dropped steps so far; `NonFiniteError` if the run must stop."""
        guard = jax.tree.map(to_host, state["guard"])
        skipped = int(guard["skipped"])
        if skipped == 0:
            return 0
        saved = (
            f"the last good checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"{self.describe(guard)}; it was not applied and nothing after it was saved; "
                f"{saved}. Lower train.learning_rate, or set train.nonfinite=skip"
            )
        if skipped > self.max_skipped:
            raise NonFiniteError(
                f"{skipped} steps had a non-finite loss or gradient, more than "
                f"train.max_skipped_steps={self.max_skipped} ({self.describe(guard)}); {saved}"
            )
        if skipped > self.seen_skipped:
            log.warning("%d non-finite steps skipped so far; %s", skipped, self.describe(guard))
            self.seen_skipped = skipped
        return skipped
