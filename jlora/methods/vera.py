"""VeRA (Kopiczko et al., ICLR 2024): trainable scaling vectors around one shared random pair.

One frozen random pair is shared by every target, drawn at the largest input and output sizes
(and rank) among them and sliced per target, exactly as PEFT's `VeraModel`: in PyTorch layout
`vera_A: (r, max_in)` and `vera_B: (max_out, r)`, both Kaiming-uniform with gain √2 over their
second axis (U(−√(6/max_in), √(6/max_in)) and U(−√(6/r), √(6/r))), sliced `[:, :d_in]` and
`[:d_out, :]`. Each target trains two vectors, `d (r,)` (init `vera_d_initial`, 0.1) and
`b (d_out,)` (init 0, so ΔK = 0 at init):

  ΔW = diag(b) · B_s · diag(d) · A_s  (PyTorch layout, (out, in)), i.e. in Flax layout
  ΔK = (A_sᵀ · diag(d)) @ (B_sᵀ · diag(b)): factors A (d_in, r) and B (r, d_out).

There is no alpha: PEFT's VeRA has no scaling, so the scale is 1 whatever `alpha` and `rslora`
say. The pair is drawn from `vera_projection_prng_key` with JAX's PRNG (PEFT's option name; the
numbers differ from PyTorch's generator, the distribution is the same); `plan` sets it as every
target's `spec.seed` and records the shared sizes (`max_in`, `max_out`, `max_rank`) in
`spec.info`, so each target's slice is reproducible from its spec alone. With `vera_basis=
"regenerate"` (default) the pair is drawn again inside every step (nothing stored; r·(max_in +
max_out) random numbers per target and step); with `"cache"` each target keeps its slice as frozen
leaves `A`, `B`.
Either way exports store only d and b; the PEFT export folds each target into an exact rank-r
LoRA (`lora_alpha = r`).

Example:
  >>> import jax.numpy as jnp, jlora, jlora.methods.vera
  >>> params = {"q": {"kernel": jnp.ones((6, 5))}, "up": {"kernel": jnp.ones((6, 9))}}
  >>> _, ad = jlora.init(jlora.AdapterConfig(method="vera", rank=2), params, 0)
  >>> {n: x.shape for n, x in ad["q/kernel"].params.items()}
  {'b': (5,), 'd': (2,)}
  >>> ad["q/kernel"].spec.get("max_out"), ad["q/kernel"].spec.scale
  (9, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jlora import validation as v
from jlora.methods.base import (
    IN,
    OUT,
    RANK,
    AdapterSpec,
    Leaf,
    Leaves,
    Method,
    Options,
    register,
)

# Seeds travel as traced int32 through `jlora.init`/`merge`/exports (one compilation per shape).
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraOptions(Options):
    """Options of `vera`."""

    prefix = "vera"
    # Initial value of every entry of the trainable vector d (PEFT's `d_initial`).
    d_initial: float = 0.1
    # Seed of the shared random pair (PEFT's `projection_prng_key`; JAX's PRNG draws it).
    projection_prng_key: int = 0
    # "regenerate" the shared pair from its seed inside every step, or "cache" each target's
    # slice as frozen leaves.
    basis: str = "regenerate"

    def __post_init__(self) -> None:
        self._set(
            "d_initial",
            v.as_float(self._flat("d_initial"), self.d_initial, lambda x: True, "a finite number"),
        )
        if not v.is_int(self.projection_prng_key, 0, MAX_SEED):
            v.fail(
                self._flat("projection_prng_key"),
                self.projection_prng_key,
                f"an integer in [0, {MAX_SEED}]",
            )
        if not v.is_text(self.basis, ("regenerate", "cache")):
            v.fail(self._flat("basis"), self.basis, "'regenerate' or 'cache'")


def kaiming_uniform_torch(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """PEFT's `_kaiming_init`: U(−b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def shared_pair(spec: AdapterSpec) -> tuple[jax.Array, jax.Array]:
    """The whole shared pair in PyTorch layout, `vera_A (max_rank, max_in)` and
    `vera_B (max_out, max_rank)`, drawn from `spec.seed` (traceable)."""
    r, d_in, d_out = spec.get("max_rank"), spec.get("max_in"), spec.get("max_out")
    if None in (r, d_in, d_out) or spec.seed is None:
        raise ValueError(
            f"vera spec without its shared sizes or seed (info={spec.info}, seed={spec.seed}): "
            "make vera adapters with jlora.init, which runs the method's plan"
        )
    ka, kb = jax.random.split(jax.random.key(spec.seed))
    return kaiming_uniform_torch(ka, (r, d_in)), kaiming_uniform_torch(kb, (d_out, r))


def projections(spec: AdapterSpec) -> Leaves:
    """This target's slice of the shared pair in Flax layout: `A (d_in, r)` = `vera_A[:r, :d_in]ᵀ`
    and `B (r, d_out)` = `vera_B[:d_out, :r]ᵀ`, broadcast over the stacked axes."""
    vera_A, vera_B = shared_pair(spec)
    r = spec.rank
    A = vera_A[:r, : spec.d_in].T
    B = vera_B[: spec.d_out, :r].T
    return {
        "A": jnp.broadcast_to(A, (*spec.stack, *A.shape)),
        "B": jnp.broadcast_to(B, (*spec.stack, *B.shape)),
    }


class Vera(Method):
    """VeRA: trainable vectors d and b scaling one frozen random pair shared by all targets."""

    name = "vera"
    options_class = VeraOptions

    def scale(self, rank: int, alpha: float, config: object) -> float:
        return 1.0  # PEFT's VeRA has no alpha scaling

    def plan(
        self,
        specs: Mapping[str, AdapterSpec],
        kernels: Mapping[str, jax.Array],
        grads: Mapping[str, jax.Array] | None,
        keys: Mapping[str, jax.Array],
    ) -> dict[str, AdapterSpec]:
        if not specs:
            return {}
        # The pair is drawn at the largest sizes among the targets (PEFT's `_find_dim`).
        info = (
            ("max_in", max(s.d_in for s in specs.values())),
            ("max_out", max(s.d_out for s in specs.values())),
            ("max_rank", max(s.rank for s in specs.values())),
        )
        return {
            p: dataclasses.replace(s, seed=s.options.projection_prng_key, info=info)
            for p, s in specs.items()
        }

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        out = {"d": Leaf((RANK,)), "b": Leaf((OUT,))}
        if spec.options.basis == "cache":
            out["A"] = Leaf((IN, RANK), trainable=False, regenerable=True)
            out["B"] = Leaf((RANK, OUT), trainable=False, regenerable=True)
        return out

    def regenerate(self, spec: AdapterSpec) -> Leaves:
        return projections(spec)

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        leaves = {
            "d": jnp.full((*spec.stack, spec.rank), spec.options.d_initial, jnp.float32),
            "b": jnp.zeros((*spec.stack, spec.d_out), jnp.float32),
        }
        if spec.options.basis == "cache":
            leaves.update(projections(spec))
        return leaves

    def factors(self, params: Leaves, spec: AdapterSpec) -> tuple[jax.Array, None, jax.Array]:
        pair = {n: params[n] for n in ("A", "B")} if "A" in params else projections(spec)
        d, b = params["d"], params["b"]
        A = pair["A"].astype(d.dtype) * d[..., None, :]
        B = pair["B"].astype(b.dtype) * b[..., None, :]
        return A, None, B


register(Vera())
