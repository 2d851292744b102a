"""GoRA's pre-pass: the mean gradient of every target kernel over a few micro-batches.

Only the target kernels are differentiated (the rest of the parameters are a constant of the
jitted step), gradients accumulate in one fp32 buffer per target that is donated back to the step,
and no optimizer step is taken. Peak memory: the parameters, one fp32 copy of the target kernels,
one gradient and the activations of one micro-batch.

The gradient of a kernel that a Flax `nn.Dense` multiplies (the usual case) is computed by a
tap on that Dense's output (`jlora.linen.tap`, registered in `TAPS`), one 2-D `xᵀ @ g` matmul
over flattened tokens, instead of autodiff through the Dense (which XLA-CPU runs with a
transposed copy of every output gradient). A target kernel used any other way (an NNX model, a
hand-written matmul), or stacked by `nn.scan`, gets plain autodiff. A kernel that a Dense
multiplies *and* some other code reads would get only the Dense's part of its gradient: pass
such parameters as a separate, non-target leaf.

On a base kept quantized (`jlora.quant`), each target's gradient is taken at its dequantized
kernel (in its original dtype, a temporary of the jitted step) and the other quantized kernels
run dequantized inside their layers (the Linen tap enters `jlora.quant.dequantizing`).

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

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jlora import quant, targets
from jlora.config import AdapterConfig

log = logging.getLogger("jlora")


# Framework wings (`jlora.linen`) register a tap: `tap(probes, tapped)` is a context manager under
# which the loss runs, routing the kernel gradient of each layer it recognises through a probe
# (`probes[path]`, shaped like the kernel; its cotangent is the gradient) and adding the path to
# `tapped`. Kernels no tap saw get plain autodiff.
Tap = Callable[[dict[str, jax.Array], set[str]], contextlib.AbstractContextManager]
TAPS: list[Tap] = []


def register_tap(tap: Tap) -> Tap:
    """Adds a framework's gradient tap (see `TAPS`)."""
    TAPS.append(tap)
    return tap


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
    kernels = {p: flat[p].dequantize() if quant.is_quantized(flat[p]) else flat[p] for p in acc}
    tapped: set[str] = set()

    # Kernels that a targeted Flax Dense multiplies get their gradient from `_tap` (the
    # accumulator doubles as the probe: only its shape and dtype matter); any other use of a
    # target kernel (a hand-written matmul, a non-Flax model) gets it from plain autodiff. XLA
    # drops the autodiff kernel gradients that are not returned.
    def loss(k: dict[str, jax.Array], probes: dict[str, jax.Array]) -> jax.Array:
        with contextlib.ExitStack() as stack:
            for tap in TAPS:
                stack.enter_context(tap(probes, tapped))
            return loss_fn(targets.replace(params, k), batch)

    dk, dprobe = jax.grad(loss, argnums=(0, 1))(kernels, acc)
    return {
        p: a + (dprobe[p] if p in tapped else dk[p]).astype(jnp.float32) for p, a in acc.items()
    }


def _layout(kernel: Any) -> Any:
    """A kernel's sharding when it spans several devices (else None: an uncommitted array, so
    the jitted step's cache key is the one a single-device caller compiled)."""
    s = (
        quant.kernel_sharding(kernel)
        if quant.is_quantized(kernel)
        else getattr(kernel, "sharding", None)
    )
    return s if s is not None and len(s.device_set) > 1 else None


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
    tgts = targets.select(params, config.targets, config.rank, config.alpha, need_layouts=False)
    flat = targets.flatten(params)
    # Each accumulator takes its kernel's layout (on a mesh: FSDP/tensor-sharded, never whole
    # on one device); the donated step keeps it.
    acc = {t.path: jnp.zeros(t.shape, jnp.float32, device=_layout(flat[t.path])) for t in tgts}
    n, start = 0, time.perf_counter()
    for batch in batches:
        acc = _accumulate(acc, params, batch, loss_fn=loss_fn)
        n += 1
        if log_every and n % log_every == 0:
            log.info("gradient_stats: %d batches, %.1fs", n, time.perf_counter() - start)
    if n == 0:
        raise ValueError("gradient_stats: batches is empty; a pre-pass needs a micro-batch")
    return {p: a / n for p, a in acc.items()}
