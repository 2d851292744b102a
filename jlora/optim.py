"""An optax optimizer that updates exactly the method's trainable adapter leaves.

Leaves are labelled from their `AdapterSpec` (LoRA A, B; SLoRA/NLoRA A, M, B; IntTune M; NOLA
α, β; GoRA A, B with B at `gora_lr_ratio` × the learning rate) and `optax.partition` gives each
group its own copy of `tx`; frozen leaves go to `optax.set_to_zero()`, which keeps no state.
(`optax.masked` would not freeze: it passes unmasked updates through unchanged.)

Example:
  >>> import jax.numpy as jnp, optax, jlora
  >>> params = {"q": {"kernel": jnp.ones((8, 8))}}
  >>> _, ad = jlora.init(jlora.AdapterConfig(method="inttune", rank=2), params)
  >>> tx = jlora.optimizer(ad, optax.adam(1e-3))
  >>> state = tx.init(ad)
  >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # Adam's mu and nu of M only
  8
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.adapters import Adapters
from jlora.methods import Adapter

FROZEN = "frozen"


def _label(name: str, adapter: Adapter, path: str, decay: Callable[[str, str], bool] | None) -> str:
    spec = adapter.spec
    if name not in spec.trainable:
        return FROZEN
    ratio = dict(spec.lr_ratios).get(name, 1.0)
    wd = decay is None or decay(path, name)
    return f"lr×{ratio:g}" + ("+wd" if wd else "")


def labels(adapters: Adapters, decay: Callable[[str, str], bool] | None = None) -> Adapters:
    """A pytree like `adapters` whose leaves are the optimizer group names."""
    return {
        p: Adapter(params={n: _label(n, a, p, decay) for n in a.params}, spec=a.spec)
        for p, a in adapters.items()
    }


def decoupled_weight_decay(
    weight_decay: float, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Adds `−lr(t) · weight_decay · p` to the updates (AdamW's decay, after `tx`'s lr scaling)."""

    def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):  # type: ignore[no-untyped-def]
        if params is None:
            raise ValueError("decoupled_weight_decay needs params: tx.update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(
            lambda u, p: u - (lr * weight_decay * p).astype(u.dtype), updates, params
        )
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer(
    adapters: Adapters,
    tx: optax.GradientTransformation,
    *,
    weight_decay: float = 0.0,
    learning_rate: optax.ScalarOrSchedule | None = None,
    decay: Callable[[str, str], bool] | None = None,
) -> optax.GradientTransformation:
    """`tx` applied to the trainable leaves of `adapters` only.

    Args:
      adapters: `{path: Adapter}` from `jlora.init` (only its structure and specs are read).
      tx: the optimizer of the trainable leaves, e.g. `optax.adam(schedule)`.
      weight_decay: decoupled (AdamW) weight decay; needs `learning_rate`, the same value or
        schedule `tx` uses, since the decay is scaled by it. With `tx = optax.adam(lr)` this is
        exactly `optax.adamw(lr, weight_decay)` on the decayed leaves.
      learning_rate: see `weight_decay`.
      decay: `(path, leaf_name) -> bool` choosing the decayed leaves; None decays every
        trainable leaf.

    Learning-rate ratios in the adapters' specs (GoRA's B) scale that group's whole update,
    decay included, as LoRA+ does.
    """
    if weight_decay and learning_rate is None:
        raise ValueError("optimizer(weight_decay=...) needs learning_rate= (the lr of tx)")
    lab = labels(adapters, decay if weight_decay else (lambda p, n: False))
    return partitioned(lab, set(jax.tree.leaves(lab)), tx, weight_decay, learning_rate)


def partitioned(
    lab: Any,
    groups: set[str],
    tx: optax.GradientTransformation,
    weight_decay: float,
    learning_rate: optax.ScalarOrSchedule | None,
) -> optax.GradientTransformation:
    """`optax.partition` over the groups that `labels` names (`lab`: a label tree, or a function
    of the parameters giving one): `tx` per group, scaled by its ratio, decayed if "+wd"."""
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for group in groups - {FROZEN}:
        ratio = float(group.removeprefix("lr×").removesuffix("+wd"))
        parts = [tx]
        if group.endswith("+wd"):
            parts.append(decoupled_weight_decay(weight_decay, learning_rate))  # type: ignore[arg-type]
        if ratio != 1.0:
            parts.append(optax.scale(ratio))
        transforms[group] = optax.chain(*parts)
    return optax.partition(transforms, lab)
