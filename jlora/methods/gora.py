"""GoRA (He et al. 2025): per-matrix ranks and B's init from gradients gathered before training.

1. `importance`: I_t = mean(|K_t ⊙ G_t|) with G_t the mean gradient of the pre-pass.
2. `allocate_ranks`: with a_t = I_t / Σ I and the budget T = Σ_t (d_in + d_out)·r_ref (what
   uniform LoRA at r_ref trains), r_t = clip(floor(round(T·a_t) / (d_in + d_out)), r_min, r_max)
   exactly as the official `get_allocated_rank` ("moderate" strategy): the parameter share is
   rounded first (half to even, as Python's `round`), then the division is floored; a_t is
   normalised in float32, as the official code's `torch.tensor` of importances is.
3. init: A ~ Kaiming-uniform (d_in, r_t), `B = −ξ (AᵀA + εI)⁻¹ Aᵀ G` with ξ = γ·√d_in / alpha and
   scale s_t = alpha / √r_t, so `s·A@B = −γ·√(d_in/r_t) · P_A G`: one compressed gradient-descent
   step (the minus sign is the paper's; the official repository's latest commit dropped it).
4. Training uses LoRA+: B's learning rate is `gora_lr_ratio` × A's (`AdapterSpec.lr_ratios`).

Steps 1–2 are the method's `plan` (the whole model at once); the ranks and each target's budget
share are in `spec.info`. Stacked kernels get one rank per matrix; their factors are zero-padded
to the largest rank of the stack. That is exact: padded columns of A and rows of B are zero and
receive zero gradient.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"q": {"kernel": jnp.ones((8, 8))}, "v": {"kernel": jnp.ones((8, 8))}}
  >>> grads = {"q/kernel": jnp.ones((8, 8)), "v/kernel": jnp.full((8, 8), 3.0)}
  >>> cfg = jlora.AdapterConfig(method="gora", rank=4, gora_rank_range=(1, 8))
  >>> _, ad = jlora.init(cfg, params, 0, grads=grads)
  >>> ad["q/kernel"].spec.rank, ad["v/kernel"].spec.rank, ad["v/kernel"].spec.get("budget")
  (2, 6, 64)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import linalg
from jlora import validation as v
from jlora.methods.base import (
    AdapterSpec,
    Leaves,
    Method,
    Options,
    kaiming_uniform,
    per_matrix,
    register,
)

log = logging.getLogger("jlora")

EPS = 1e-8


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoraOptions(Options):
    """Options of `gora`."""

    prefix = "gora"
    # (r_min, r_max) bounds of the allocated ranks.
    rank_range: tuple[int, int] = (4, 32)
    # Step size gamma of the compressed-gradient B init.
    gamma: float = 5e-2
    # Learning-rate ratio of B over A (LoRA+).
    lr_ratio: float = 16.0

    def __post_init__(self) -> None:
        rr = self.rank_range
        if not (v.is_pair(rr) and rr[0] <= rr[1]):
            allowed = f"a pair (r_min, r_max) of integers with 1 <= r_min <= r_max <= {v.MAX_SIZE}"
            v.fail(self._flat("rank_range"), rr, allowed)
        self._set("rank_range", tuple(rr))
        self._set(
            "gamma",
            v.as_float(self._flat("gamma"), self.gamma, lambda x: x >= 0, "a finite number >= 0"),
        )
        self._set(
            "lr_ratio",
            v.as_float(
                self._flat("lr_ratio"), self.lr_ratio, lambda x: x > 0, "a finite number > 0"
            ),
        )


@jax.jit
def importance(K: jax.Array, G: jax.Array) -> jax.Array:
    """mean(|K ⊙ G|) per matrix of a (possibly stacked) kernel, in fp32."""
    return jnp.mean(jnp.abs(K.astype(jnp.float32) * G.astype(jnp.float32)), axis=(-2, -1))


def allocate_ranks(
    importances: Mapping[str, np.ndarray],
    dims: Mapping[str, tuple[int, int]],
    ref_ranks: Mapping[str, int],
    rank_range: tuple[int, int],
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Ranks per matrix (arrays shaped like each target's stack) and each target's budget share.

    The budget of a target is what uniform LoRA at its reference rank trains; their sum is T.
    """
    r_min, r_max = rank_range
    imp = {p: np.asarray(x, np.float32) for p, x in importances.items()}
    total = np.float32(sum(np.float32(x.sum(dtype=np.float32)) for x in imp.values()))
    budgets = {p: int((sum(dims[p]) * ref_ranks[p]) * imp[p].size) for p in imp}
    T = sum(budgets.values())
    ranks = {}
    for p, x in imp.items():
        n = sum(y.size for y in imp.values())
        # Importance zero everywhere (e.g. a loss independent of the targets): uniform ranks.
        share = x / total if total > 0 else np.full_like(x, np.float32(1.0) / np.float32(n))
        params = np.round(T * share.astype(np.float64))  # half to even, as Python's round
        r = np.clip(np.floor(params / sum(dims[p])), r_min, r_max)
        ranks[p] = np.minimum(r, min(dims[p])).astype(np.int64)  # a rank above min(d) is waste
    return ranks, budgets


def scale_of(ranks: np.ndarray, alpha: float) -> float | tuple:
    """Per-matrix scales alpha / √r_t, as a float or nested tuples over the stacked axes."""
    s = alpha / np.sqrt(np.asarray(ranks, np.float64))
    return float(s) if s.ndim == 0 else nested_tuple(s)


def nested_tuple(a: np.ndarray) -> int | float | tuple:
    """An array as nested tuples of Python scalars (hashable pytree metadata)."""
    return a.item() if a.ndim == 0 else tuple(nested_tuple(x) for x in a)


class Gora(Method):
    """GoRA: ranks allocated by gradient importance, B initialised from the gradient."""

    name = "gora"
    options_class = GoraOptions
    needs_grads = True

    def scale(self, rank: int, alpha: float, config: object) -> float:
        return alpha / math.sqrt(rank)  # always rank-stabilised

    def lr_ratios(self, options: Options) -> tuple[tuple[str, float], ...]:
        return (("B", float(options.lr_ratio)),)

    def plan(
        self,
        specs: Mapping[str, AdapterSpec],
        kernels: Mapping[str, jax.Array],
        grads: Mapping[str, jax.Array] | None,
        keys: Mapping[str, jax.Array],
    ) -> dict[str, AdapterSpec]:
        if grads is None:  # shapes only (jlora.abstract_init): zero importance, uniform ranks
            imps = {p: np.zeros(s.stack) for p, s in specs.items()}
        else:
            imps = {p: np.asarray(importance(kernels[p], grads[p])) for p in specs}
        rank_range = next(iter(specs.values())).options.rank_range if specs else (1, 1)
        ranks, budgets = allocate_ranks(
            imps,
            {p: (s.d_in, s.d_out) for p, s in specs.items()},
            {p: s.rank for p, s in specs.items()},
            rank_range,
        )
        out = {}
        for p, s in specs.items():
            info = (("budget", budgets[p]), ("ranks", nested_tuple(ranks[p])))
            rank = int(ranks[p].max())
            out[p] = dataclasses.replace(s, rank=rank, scale=scale_of(ranks[p], s.alpha), info=info)
        allocated = sum(
            int(((s.d_in + s.d_out) * np.asarray(s.get("ranks"))).sum()) for s in out.values()
        )
        log.info(
            "jlora.init: gora allocated %d parameters for a budget of %d",
            allocated,
            sum(budgets.values()),
        )
        return out

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        if grad is None:
            raise ValueError("gora needs the pre-pass gradients: jlora.init(..., grads=...)")
        r = spec.rank
        ranks = np.asarray(spec.get("ranks"), np.int64)
        mask = jnp.asarray(np.arange(r) < ranks[..., None], jnp.float32)  # (*stack, r)
        xi = spec.options.gamma * math.sqrt(spec.d_in) / spec.alpha

        def one(k: jax.Array, G: jax.Array, m: jax.Array) -> Leaves:
            A = kaiming_uniform(k, spec.d_in, r) * m
            return {"A": A, "B": -xi * linalg.ridge_project(A, G.astype(jnp.float32), EPS)}

        return per_matrix(one, spec.stack, key, grad, mask)


register(Gora())
