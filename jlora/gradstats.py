"""GoRA's pre-pass: the mean gradient of every target kernel over a few micro-batches.

Only the target kernels are differentiated (the rest of the parameters are a constant of the
jitted step), gradients accumulate in one fp32 buffer per target that is donated back to the step,
and no optimizer step is taken. Peak memory: the parameters, one fp32 copy of the target kernels,
one gradient and the activations of one micro-batch.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
  >>> loss = lambda p, x: jnp.sum(x @ p["w"]["kernel"])
  >>> cfg = jlora.AdapterConfig(method="gora", rank=1, gora_rank_range=(1, 2))
  >>> g = jlora.gradient_stats(loss, params, [jnp.ones((2, 4))] * 3, cfg)
  >>> g["w/kernel"][0, 0]
  Array(2., dtype=float32)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jlora import targets
from jlora.config import AdapterConfig

log = logging.getLogger("jlora")


@functools.partial(jax.jit, static_argnames="loss_fn", donate_argnums=0)
def _accumulate(
    acc: dict[str, jax.Array],
    params: Any,
    batch: Any,
    *,
    loss_fn: Callable[[Any, Any], jax.Array],
) -> dict[str, jax.Array]:
    # The target kernels are read out of `params` inside the step rather than passed as a second
    # argument: XLA would count them twice in the step's memory (it cannot know they alias).
    flat = targets.flatten(params)
    kernels = {p: flat[p] for p in acc}

    def loss_of_kernels(k: dict[str, jax.Array]) -> jax.Array:
        return loss_fn(targets.replace(params, k), batch)

    grads = jax.grad(loss_of_kernels)(kernels)
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)


def gradient_stats(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    config: AdapterConfig,
    *,
    log_every: int = 8,
) -> dict[str, jax.Array]:
    """Mean fp32 gradient `{path: G}` of each target kernel of `config` over `batches`.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, traceable. Keep it the same object across
        calls (it is a static argument of the jitted step).
      params: the pretrained parameters.
      batches: an iterable of micro-batches (pytrees of arrays). Batches of one shape compile once.
      config: selects the target kernels (as `jlora.init` will).
      log_every: log progress every this many batches (logger "jlora", level INFO).

    Returns:
      What `jlora.init(config, params, key, grads=...)` takes.
    """
    tgts = targets.select(params, config.targets, config.rank, config.alpha)
    acc = {t.path: jnp.zeros(t.shape, jnp.float32) for t in tgts}
    n, start = 0, time.perf_counter()
    for batch in batches:
        acc = _accumulate(acc, params, batch, loss_fn=loss_fn)
        n += 1
        if log_every and n % log_every == 0:
            log.info("gradient_stats: %d batches, %.1fs", n, time.perf_counter() - start)
    if n == 0:
        raise ValueError("gradient_stats: batches is empty; GoRA needs at least one micro-batch")
    return {p: a / n for p, a in acc.items()}
