"""LoRA-GA (Wang et al., NeurIPS 2024): A and B from the SVD of the gradient, as PEFT's `lora_ga`.

`G` is the mean gradient of the target kernel over the pre-pass (`jlora.gradient_stats`, the one
GoRA uses). PEFT's `preprocess_loraga` also averages: it divides the `weight.grad` accumulated by
its `train_step` by the number of backward passes through the module; it runs the model in train
mode, so with the model's dropout, where jlora's pre-pass has none. In Flax layout
`G: (d_in, d_out)` is PyTorch's gradient transposed, `G = U S Vᵀ`, so PyTorch's `V` (in-features
side) is our `U`, and the top-2r components are split between the factors (`loraga_direction`,
PEFT's names):

- "ArB2r" (default): A = U[:, :r], B = S[r:2r] · Vᵀ[r:2r]  (PyTorch: lora_A = Vh[:r],
  lora_B = U[:, r:2r] · S[r:2r]);
- "A2rBr": A from components r..2r−1, B from 0..r−1;
- "ArBr": A from the odd components 1, 3, ..., B from the even ones 0, 2, ...;
- "random": one random choice of r of the 2r components for both (the target's key).

Then `loraga_scale`:
- "stable" (default): B ·= d_out^¼ / √`loraga_stable_gamma` (16);
- "weight_svd": B ·= σ₁(K) / S_B[0] (S_B: the singular values B took; skipped if S_B[0] = 0);
- "gd_scale": A /= s and B /= s (s the LoRA scale);
- "unit": nothing.

The frozen kernel becomes `K − s · A @ B` (residual, as PEFT rewrites the base weight), so the
output is unchanged at init; the PEFT export is rank 2r on the original base, as for PiSSA.

The SVD: `loraga_niter=None` (default) takes the exact top-2r SVD, deterministic; PEFT runs
`torch.svd_lowrank(G, q=min(4r, d), niter=4)`, a randomized approximation of it (and of σ₁(K)
by `svd_lowrank(K, q=r, niter=4)` for "weight_svd"); an integer runs that algorithm with that
many power iterations, its sketch drawn from the target's key. Singular vectors are defined up to
sign, and with "ArB2r", "A2rBr" and "ArBr" the init depends on the signs (A and B take different
components); jlora fixes them (the largest-magnitude entry of each column of U is positive).
PEFT's signs come from its random sketch (PyTorch's global generator). Every sign choice gives the
same output at init, not the same training trajectory (nor do two PEFT runs).

Example:
  >>> import jax, jax.numpy as jnp, jlora, jlora.methods.loraga
  >>> K = jax.random.normal(jax.random.key(0), (8, 6))
  >>> G = {"q/kernel": jax.random.normal(jax.random.key(1), (8, 6))}
  >>> cfg = jlora.AdapterConfig(method="loraga", rank=2)
  >>> base, ad = jlora.init(cfg, {"q": {"kernel": K}}, 0, grads=G)
  >>> a = ad["q/kernel"]
  >>> bool(jnp.allclose(base["q"]["kernel"] + a.spec.scale * a.params["A"] @ a.params["B"], K,
  ...                   atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora import linalg
from jlora import validation as v
from jlora.methods.base import AdapterSpec, Leaves, Method, Options, per_matrix, register

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraGaOptions(Options):
    """Options of `loraga` (PEFT's `LoraGAConfig`, plus the SVD algorithm)."""

    prefix = "loraga"
    # Which of the top-2r gradient components A and B take (PEFT's `direction`).
    direction: str = "ArB2r"
    # Scaling of the factors (PEFT's `scale`).
    scale: str = "stable"
    # Gamma of the "stable" scaling (PEFT's `stable_gamma`).
    stable_gamma: float = 16.0
    # None: exact SVD; an integer: PEFT's randomized SVD with this many power iterations.
    niter: int | None = None

    def __post_init__(self) -> None:
        if not v.is_text(self.direction, DIRECTIONS):
            v.fail(self._flat("direction"), self.direction, f"one of {', '.join(DIRECTIONS)}")
        if not v.is_text(self.scale, SCALES):
            v.fail(self._flat("scale"), self.scale, f"one of {', '.join(SCALES)}")
        self._set(
            "stable_gamma",
            v.as_float(
                self._flat("stable_gamma"), self.stable_gamma, lambda x: x > 0, "a number > 0"
            ),
        )
        if self.niter is not None and not v.is_int(self.niter):
            allowed = f"None (exact SVD) or an integer >= 0 (at most {v.MAX_SIZE})"
            v.fail(self._flat("niter"), self.niter, allowed)


def top_svd(
    M: jax.Array, k: int, q: int, niter: int | None, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k SVD of M: exact (`niter` None), or `torch.svd_lowrank(M, q, niter)`'s algorithm
    (Halko et al.'s range finder with a q-column sketch on M's longer side), first k kept."""
    if niter is None:
        return linalg.top_svd(M, k)
    if M.shape[0] >= M.shape[1]:
        return linalg.randomized_svd(M, k, niter, key, oversample=q - k)
    U, S, Vt = linalg.randomized_svd(M.T, k, niter, key, oversample=q - k)
    return Vt.T, S, U.T


def fix_signs(U: jax.Array, Vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips each singular pair so that the largest-magnitude entry of U's column is positive."""
    rows = jnp.argmax(jnp.abs(U), axis=0)
    sign = jnp.sign(U[rows, jnp.arange(U.shape[1])])
    sign = jnp.where(sign == 0, 1.0, sign).astype(U.dtype)
    return U * sign, Vt * sign[:, None]


def components(direction: str, r: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices (into the top 2r) of the components A and B take."""
    if direction == "ArB2r":
        return jnp.arange(r), jnp.arange(r, 2 * r)
    if direction == "A2rBr":
        return jnp.arange(r, 2 * r), jnp.arange(r)
    if direction == "ArBr":
        return jnp.arange(1, 2 * r, 2), jnp.arange(0, 2 * r, 2)
    idx = jax.random.permutation(key, 2 * r)[:r]
    return idx, idx


class LoraGa(Method):
    """LoRA-GA: factors from the gradient's top-2r SVD; the frozen kernel keeps the residual."""

    name = "loraga"
    options_class = LoraGaOptions
    needs_grads = True

    def residual(self, options: Options) -> bool:
        return True

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        if grad is None:
            raise ValueError("loraga needs the pre-pass gradients: jlora.init(..., grads=...)")
        r, o = spec.rank, spec.options
        d_in, d_out = spec.d_in, spec.d_out
        if 2 * r > min(d_in, d_out):
            raise ValueError(
                f"loraga rank {r} on a {spec.kernel_shape} kernel: LoRA-GA takes 2r = {2 * r} "
                f"gradient components, at most min(d_in, d_out) = {min(d_in, d_out)}"
            )
        q = min(4 * r, d_in, d_out)
        s = float(spec.scale)

        def one(k: jax.Array, W: jax.Array, G: jax.Array) -> Leaves:
            k_svd, k_perm, k_weight = jax.random.split(k, 3)
            U, S, Vt = top_svd(G.astype(jnp.float32), 2 * r, q, o.niter, k_svd)
            U, Vt = fix_signs(U, Vt)
            ia, ib = components(o.direction, r, k_perm)
            A = U[:, ia]
            S_B = S[ib]
            B = S_B[:, None] * Vt[ib]
            if o.scale == "stable":
                B = B * (d_out**0.25 / o.stable_gamma**0.5)
            elif o.scale == "weight_svd":
                w_top = top_svd(W, r, r, o.niter, k_weight)[1][0]
                B = jnp.where(S_B[0] > 0, B * (w_top / jnp.where(S_B[0] > 0, S_B[0], 1.0)), B)
            elif o.scale == "gd_scale":
                A, B = A / s, B / s
            return {"A": A, "B": B}

        return per_matrix(one, spec.stack, key, K, grad)


register(LoraGa())
