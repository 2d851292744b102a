"""NOLA (Koohpayegani et al., ICLR 2024): factors as mixtures of frozen random bases.

`A = A0 + Σ_i α_i A_i`, `B = Σ_j β_j B_j`, `ΔK = s · A @ B`; only α (k numbers) and β (l numbers)
train. Bases `A_i: (d_in, r)` and `B_j: (r, d_out)` are U(−1, 1)/√k (resp. /√l) and `A0` is a
frozen Kaiming-uniform offset, all drawn from the target's seed (`AdapterSpec.seed`, drawn per
target by `plan`; stacked matrices fold in their flat index). α = β = 0 at init, so ΔK = 0 and the
offset lets β receive a gradient from the first step. With `nola_basis="regenerate"` (default) the
bases are drawn again inside every step, in the forward pass and once more in the backward pass
(nothing stored; O(k·r·d) transient memory per target; on XLA:CPU use scanned layers, since the
draws' loops of unrolled layers do not share memory); with `"cache"` they are frozen leaves of the
adapter, which is faster and larger. Either way exports store only α and β: the bases come back
from the seed.

Example:
  >>> import jax.numpy as jnp, jlora
  >>> cfg = jlora.AdapterConfig(method="nola", rank=2, nola_num_basis=(4, 3))
  >>> _, ad = jlora.init(cfg, {"q": {"kernel": jnp.ones((6, 5))}}, 0)
  >>> {n: x.shape for n, x in ad["q/kernel"].params.items()}
  {'alpha': (4,), 'beta': (3,)}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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
    kaiming_uniform,
    register,
)

BASIS_LEAVES = ("A0", "A_basis", "B_basis")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NolaOptions(Options):
    """Options of `nola`."""

    prefix = "nola"
    # Numbers of random bases (k for A, l for B).
    num_basis: tuple[int, int] = (256, 256)
    # "regenerate" the bases from their seed inside every step, or "cache" them as frozen leaves.
    basis: str = "regenerate"

    def __post_init__(self) -> None:
        if not v.is_pair(self.num_basis):
            allowed = f"a pair (k, l) of integers >= 1 (at most {v.MAX_SIZE})"
            v.fail(self._flat("num_basis"), self.num_basis, allowed)
        self._set("num_basis", tuple(self.num_basis))
        if not v.is_text(self.basis, ("regenerate", "cache")):
            v.fail(self._flat("basis"), self.basis, "'regenerate' or 'cache'")


def bases(spec: AdapterSpec) -> Leaves:
    """The frozen offset and bases of a NOLA target, regenerated from its seed (traceable)."""
    k, l = spec.options.num_basis
    r, d_in, d_out = spec.rank, spec.d_in, spec.d_out

    def one(key: jax.Array) -> Leaves:
        k0, ka, kb = jax.random.split(key, 3)
        return {
            "A0": kaiming_uniform(k0, d_in, r),
            "A_basis": _draw(ka, (k, d_in, r)),
            "B_basis": _draw(kb, (l, r, d_out)),
        }

    root = jax.random.key(spec.seed)
    # Matrix i of a stacked kernel draws from fold_in(root, i) (row-major over the stacked
    # axes). A slice of the stack (a layer inside nn.scan) carries its matrices' flat indices
    # as info "matrix_index" (`jlora.factored`), so it regenerates exactly its own bases.
    index = spec.get("matrix_index")
    if not spec.stack:
        return one(_matrix_key(spec))
    n = math.prod(spec.stack)
    flat = jnp.arange(n) if index is None else jnp.reshape(index, (n,))
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(flat.astype(jnp.uint32))
    flat = jax.vmap(one)(keys)
    return {name: x.reshape(spec.stack + x.shape[1:]) for name, x in flat.items()}


def _matrix_key(spec: AdapterSpec) -> jax.Array:
    """The key of an unstacked target's bases: its seed's, or matrix i's of a scanned stack."""
    root, index = jax.random.key(spec.seed), spec.get("matrix_index")
    return root if index is None else jax.random.fold_in(root, index)


def _draw(key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """`n` bases of shape `(a, b)`, U(−1, 1)/√n, for `shape = (n, a, b)`."""
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) / math.sqrt(shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mix_drawn(coef: jax.Array, key_data: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """`_mix(coef, _draw(key, shape))` whose backward pass draws the bases again.

    Autodiff of the plain expression keeps every target's bases from the forward pass to the
    backward pass: `nola_basis="regenerate"` then held as much memory as `"cache"`
    (BENCHMARKS.md b). Here the backward pass keeps only the key and draws the bases from it
    once the output's cotangent exists (an optimization barrier ties the two), so XLA neither
    merges that draw with the forward one nor hoists it.
    """
    return _mix(coef, _draw(jax.random.wrap_key_data(key_data), shape))


def _mix_drawn_fwd(
    coef: jax.Array, key_data: jax.Array, shape: tuple[int, int, int]
) -> tuple[jax.Array, jax.Array]:
    return _mix_drawn(coef, key_data, shape), key_data


def _mix_drawn_bwd(
    shape: tuple[int, int, int], key_data: jax.Array, g: jax.Array
) -> tuple[jax.Array, np.ndarray]:
    key_data, g = jax.lax.optimization_barrier((key_data, g))
    basis = _draw(jax.random.wrap_key_data(key_data), shape).reshape(shape[0], -1)
    d_coef = jnp.einsum("m,nm->n", g.reshape(-1), basis, precision=jax.lax.Precision.HIGHEST)
    return d_coef, np.zeros(key_data.shape, jax.dtypes.float0)


_mix_drawn.defvjp(_mix_drawn_fwd, _mix_drawn_bwd)


def _mix(coef: jax.Array, basis: jax.Array) -> jax.Array:
    """`Σ_i coef_i · basis_i` over `(*stack, n, a, b)` bases, as a matrix-vector product.

    The bases are flattened to `(*stack, n, a·b)` first: XLA's CPU backward of the equivalent
    4-axis einsum is ~9× slower (it transposes the whole basis tensor for the coefficients'
    gradient), which made a NOLA step on a SmolLM2-shaped decoder ~2× a LoRA step.
    """
    flat = basis.reshape(*basis.shape[:-2], -1)
    mixed = jnp.einsum("...n,...nm->...m", coef, flat, precision=jax.lax.Precision.HIGHEST)
    return mixed.reshape(*basis.shape[:-3], *basis.shape[-2:])


class Nola(Method):
    """NOLA: trainable mixing coefficients of frozen random bases."""

    name = "nola"
    options_class = NolaOptions

    def plan(
        self,
        specs: Mapping[str, AdapterSpec],
        kernels: Mapping[str, jax.Array],
        grads: Mapping[str, jax.Array] | None,
        keys: Mapping[str, jax.Array],
    ) -> dict[str, AdapterSpec]:
        # One static seed per target, drawn from its key: what regenerates its bases.
        return {
            p: dataclasses.replace(s, seed=int(jax.random.randint(keys[p], (), 0, 2**31 - 1)))
            for p, s in specs.items()
        }

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        k, l = spec.options.num_basis
        out = {"alpha": Leaf((k,)), "beta": Leaf((l,))}
        if spec.options.basis == "cache":
            out["A0"] = Leaf((IN, RANK), trainable=False, regenerable=True)
            out["A_basis"] = Leaf((k, IN, RANK), trainable=False, regenerable=True)
            out["B_basis"] = Leaf((l, RANK, OUT), trainable=False, regenerable=True)
        return out

    def regenerate(self, spec: AdapterSpec) -> Leaves:
        return bases(spec)

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        k, l = spec.options.num_basis
        leaves = {
            "alpha": jnp.zeros((*spec.stack, k), jnp.float32),
            "beta": jnp.zeros((*spec.stack, l), jnp.float32),
        }
        if spec.options.basis == "cache":
            leaves.update(bases(spec))
        return leaves

    def factors(self, params: Leaves, spec: AdapterSpec) -> tuple[jax.Array, None, jax.Array]:
        alpha, beta = params["alpha"], params["beta"]
        if "A_basis" in params or spec.stack:
            b = {n: params[n] for n in BASIS_LEAVES} if "A_basis" in params else bases(spec)
            A = b["A0"].astype(alpha.dtype) + _mix(alpha, b["A_basis"])
            return A, None, _mix(beta, b["B_basis"])
        return _regenerated_factors(alpha, beta, spec)


def _regenerated_factors(
    alpha: jax.Array, beta: jax.Array, spec: AdapterSpec
) -> tuple[jax.Array, None, jax.Array]:
    """One matrix's factors from bases drawn from its key (and drawn again in the backward pass,
    `_mix_drawn`)."""
    (k, l), r = spec.options.num_basis, spec.rank
    k0, ka, kb = jax.random.split(_matrix_key(spec), 3)
    A0 = kaiming_uniform(k0, spec.d_in, r).astype(alpha.dtype)
    A = A0 + _mix_drawn(alpha, jax.random.key_data(ka), (k, spec.d_in, r))
    return A, None, _mix_drawn(beta, jax.random.key_data(kb), (l, r, spec.d_out))


register(Nola())
