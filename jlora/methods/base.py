"""What a method defines, and the adapter pytree node every method produces.

An `Adapter` holds one target's floating-point leaves (`params`) and its static `AdapterSpec`
(pytree metadata: method, scale, rank, seeds, which leaves train). `jax.grad`, `jax.tree.map`
and optax see only the leaves; `jit` caches on the spec.

A `Method` is a small record of pure functions:
- `init(K, key, spec, config, grad)`: the leaves for a (possibly stacked) fp32 kernel;
- `factors(params, spec)`: `(A, M or None, B)` with `ΔK = s · A @ M @ B`;
- `trainable(config)` and `residual(config)`: which leaves train, and whether init rewrites the
  frozen kernel to `K − ΔK_init` (PiSSA, Nyström with a pseudo-inverse core).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import AdapterConfig

Leaves = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """Static description of one target's adapter (hashable; pytree metadata)."""

    # Method name, one of jlora.config.METHODS.
    method: str
    # Rank of the stored factors (GoRA on stacked kernels: the largest rank of the stack).
    rank: int
    # LoRA alpha of the target (s = alpha / r, or alpha / √r with rsLoRA and GoRA).
    alpha: float
    # Scale s: a float, or (GoRA on stacked kernels) nested tuples over the stacked axes.
    scale: Any
    # Shape and dtype name of the targeted kernel; leading axes beyond the last two are stacked.
    kernel_shape: tuple[int, ...]
    kernel_dtype: str
    # Names of the leaves the optimizer updates.
    trainable: tuple[str, ...]
    # Learning-rate multipliers of trainable leaves, e.g. (("B", 16.0),) for GoRA's LoRA+.
    lr_ratios: tuple[tuple[str, float], ...] = ()
    # Dropout probability on the adapter input in the factored path.
    dropout: float = 0.0
    # Whether init rewrote the frozen kernel to K − ΔK_init.
    residual: bool = False
    # NOLA: seed of the random bases (regenerated from it when not cached) and (k, l).
    nola_seed: int | None = None
    nola_num_basis: tuple[int, int] | None = None
    # GoRA: allocated ranks (nested tuples over stacked axes, or an int) and the parameter
    # budget of this target (what uniform LoRA at the reference rank would train).
    ranks: Any = None
    budget: int | None = None

    @property
    def stack(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[:-2])

    @property
    def d_in(self) -> int:
        return self.kernel_shape[-2]

    @property
    def d_out(self) -> int:
        return self.kernel_shape[-1]

    def scale_array(self) -> np.ndarray:
        """The scale broadcastable against stacked `(*stack, d_in, d_out)` matrices."""
        s = np.asarray(self.scale, np.float32)
        return s.reshape((*s.shape, 1, 1)) if s.ndim else s


@flax.struct.dataclass
class Adapter:
    """One target's adapter: floating leaves plus static metadata."""

    params: Leaves
    spec: AdapterSpec = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Method:
    """The functions that define an adaptation method (see the module docstring)."""

    name: str
    init: Callable[[jax.Array, jax.Array, AdapterSpec, AdapterConfig, jax.Array | None], Leaves]
    factors: Callable[[Leaves, AdapterSpec], tuple[jax.Array, jax.Array | None, jax.Array]]
    trainable: Callable[[AdapterConfig], tuple[str, ...]]
    residual: Callable[[AdapterConfig], bool] = lambda config: False
    lr_ratios: Callable[[AdapterConfig], tuple[tuple[str, float], ...]] = lambda config: ()


def amb_factors(params: Leaves, spec: AdapterSpec) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Factors stored as leaves A, M (optional) and B."""
    return params["A"], params.get("M"), params["B"]


def per_matrix(fn: Callable[..., Any], stack: tuple[int, ...], key: jax.Array, *arrays: Any) -> Any:
    """Applies `fn(key, *matrices)` to every matrix of stacked arrays, with independent keys.

    `arrays` have the leading `stack` axes (or are None); `fn` sees one matrix each.
    """
    n = math.prod(stack)
    keys = jax.random.split(key, n).reshape(stack) if stack else key
    for _ in stack:
        fn = jax.vmap(fn)
    return fn(keys, *arrays)


def kaiming_uniform(key: jax.Array, d_in: int, r: int) -> jax.Array:
    """Kaiming-uniform(a=√5) on a (d_in, r) matrix: U(−1/√d_in, 1/√d_in), as PyTorch's Linear."""
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)
