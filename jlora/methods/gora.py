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

Stacked kernels get one rank per matrix; their factors are zero-padded to the largest rank of the
stack. That is exact: padded columns of A and rows of B are zero and receive zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import linalg
from jlora.config import AdapterConfig
from jlora.methods.base import AdapterSpec, Leaves, Method, amb_factors, kaiming_uniform, per_matrix

EPS = 1e-8


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
    imp = {p: np.asarray(v, np.float32) for p, v in importances.items()}
    total = np.float32(sum(np.float32(v.sum(dtype=np.float32)) for v in imp.values()))
    budgets = {p: int((sum(dims[p]) * ref_ranks[p]) * imp[p].size) for p in imp}
    T = sum(budgets.values())
    ranks = {}
    for p, v in imp.items():
        n = sum(x.size for x in imp.values())
        # Importance zero everywhere (e.g. a loss independent of the targets): uniform ranks.
        share = v / total if total > 0 else np.full_like(v, np.float32(1.0) / np.float32(n))
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


def _init(
    K: jax.Array, key: jax.Array, spec: AdapterSpec, config: AdapterConfig, grad: jax.Array | None
) -> Leaves:
    if grad is None:
        raise ValueError("gora needs the pre-pass gradients: jlora.init(..., grads=...)")
    r = spec.rank
    ranks = np.asarray(spec.ranks, np.int64)
    mask = jnp.asarray(np.arange(r) < ranks[..., None], jnp.float32)  # (*stack, r)
    xi = config.gora_gamma * math.sqrt(spec.d_in) / spec.alpha

    def one(k: jax.Array, G: jax.Array, m: jax.Array) -> Leaves:
        A = kaiming_uniform(k, spec.d_in, r) * m
        return {"A": A, "B": -xi * linalg.ridge_project(A, G.astype(jnp.float32), EPS)}

    return per_matrix(one, spec.stack, key, grad, mask)


GORA = Method(
    name="gora",
    init=_init,
    factors=amb_factors,
    trainable=lambda c: ("A", "B"),
    lr_ratios=lambda c: (("B", float(c.gora_lr_ratio)),),
)
