"""SLoRA, NLoRA and IntTune (arXiv 2502.14482): ΔK = s · A @ M @ B with an r×r middle matrix M.

- `slora`: A ~ Kaiming-uniform (d_in, r), M ~ U(±1/√r), B = 0; ΔK = 0 at init (only B gets a
  gradient on the first step).
- `nlora` (paper code, the default): `A = K[:, :r]`, `M = K[:r, :r]`, `B = K[:r, :]` with no
  pseudo-inverse and no residual, so the function moves at init by `s · A @ M @ B`.
  Variants: `nlora_core="pinv"` uses the textbook Nyström core and `nlora_sampling="random"`
  Gaussian sketches (`A = K Ω`, `B = Ψᵀ K`); both write the residual into the frozen kernel. Their
  core is `pinv(U) / s`, so `s · A @ M @ B` is exactly the Nyström approximation `C U⁺ R` and the
  frozen kernel keeps the Nyström error (the same normalisation PiSSA applies with 1/√s).
- `inttune`: NLoRA's init with only M trainable (r² numbers per matrix).

Fused projections (GPT-2's `attn/c_attn`, `d -> 3d` with outputs `[q | k | v]`;
`jlora.models.gpt2`) are adapted as ONE matrix, as PEFT does (PEFT targets the module `c_attn`
and transposes its Conv1D weight to `(out, in) = (3d, d)` with `fan_in_fan_out` before any init).
So NLoRA's first r rows/columns of the `(in, out)` kernel (`jlora.linalg.nystrom_first`:
`K[:, :r]`, `K[:r, :r]`, `K[:r, :]`) take the first r OUTPUT features of the fused matrix, i.e.
r query features (keys and values contribute no sampled column), and the first r input
features. microsoft/LoRA's and NOLA's GPT-2 code instead put separate rank-r adapters on the q
and v blocks (loralib's `MergedLinear(enable_lora=[True, False, True])`, k untouched): for LoRA
the trainable count is the same (`r·(d + 3d) = 2·r·(d + d)`), but the fused adapter's update is
not restricted to the q and v blocks.

Example:
  >>> import jax.numpy as jnp, jlora
  >>> cfg = jlora.AdapterConfig(method="inttune", rank=2)
  >>> _, ad = jlora.init(cfg, {"q": {"kernel": jnp.eye(4)}})
  >>> ad["q/kernel"].spec.trainable, ad["q/kernel"].params["M"].tolist()
  (('M',), [[1.0, 0.0], [0.0, 1.0]])
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora import linalg
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
    per_matrix,
    register,
)


def _amb(spec: AdapterSpec, trainable: tuple[str, ...]) -> dict[str, Leaf]:
    axes = {"A": (IN, RANK), "M": (RANK, RANK), "B": (RANK, OUT)}
    return {n: Leaf(a, trainable=n in trainable) for n, a in axes.items()}


class Slora(Method):
    """SLoRA: LoRA with a trainable r×r middle matrix."""

    name = "slora"

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        return _amb(spec, ("A", "M", "B"))

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        r = spec.rank

        def one(k: jax.Array) -> Leaves:
            ka, km = jax.random.split(k)
            bound = 1.0 / math.sqrt(r)
            return {
                "A": kaiming_uniform(ka, spec.d_in, r),
                "M": jax.random.uniform(km, (r, r), jnp.float32, -bound, bound),
            }

        leaves = per_matrix(one, spec.stack, key)
        leaves["B"] = jnp.zeros((*spec.stack, r, spec.d_out), jnp.float32)
        return leaves


@dataclasses.dataclass(frozen=True, kw_only=True)
class NloraOptions(Options):
    """Options of `nlora` and `inttune` (the Nyström init)."""

    prefix = "nlora"
    # Core: "raw" (paper code: M = K[:r, :r], no residual) or "pinv" (textbook Nyström core
    # pinv(K[:r, :r]) with the residual written into the frozen kernel).
    core: str = "raw"
    # Columns/rows: "first" (the first r) or "random" (Gaussian sketches; needs core="pinv").
    sampling: str = "first"
    # Relative cut-off of the pseudo-inverse: singular values below rcond·σ_max are dropped.
    # First-r CUR of a matrix without low-rank structure is ill-conditioned; measured on random
    # 1024² kernels, ‖C U⁺ R‖/‖K‖ is 57 at r=64 with 1e-4 and 4.3 with 1e-2.
    rcond: float = 1e-2

    def __post_init__(self) -> None:
        if not v.is_text(self.core, ("raw", "pinv")):
            v.fail(self._flat("core"), self.core, "'raw' or 'pinv'")
        if not v.is_text(self.sampling, ("first", "random")):
            v.fail(self._flat("sampling"), self.sampling, "'first' or 'random'")
        if self.sampling == "random" and self.core != "pinv":
            allowed = (
                "'pinv' when nlora_sampling='random' (a sketched core needs its pseudo-inverse)"
            )
            v.fail(self._flat("core"), self.core, allowed)
        self._set(
            "rcond",
            v.as_float(self._flat("rcond"), self.rcond, lambda x: 0 <= x < 1, "a number in [0, 1)"),
        )


class Nlora(Method):
    """NLoRA: the Nyström (CUR) init of A, M and B from the kernel; all three train."""

    name = "nlora"
    options_class = NloraOptions
    trains = ("A", "M", "B")

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        return _amb(spec, self.trains)

    def residual(self, options: Options) -> bool:
        return options.core == "pinv" or options.sampling == "random"

    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        r, o = spec.rank, spec.options

        def one(k: jax.Array, W: jax.Array) -> Leaves:
            if o.sampling == "random":
                C, U, R = linalg.nystrom_sketch(W, r, k)
            else:
                C, U, R = linalg.nystrom_first(W, r)
            if o.core == "pinv":
                U = linalg.pinv(U, o.rcond) / jnp.float32(spec.scale)
            return {"A": C, "M": U, "B": R}

        return per_matrix(one, spec.stack, key, K)


class Inttune(Nlora):
    """IntTune: NLoRA's init, only the middle matrix M trains."""

    name = "inttune"
    trains = ("M",)


register(Slora())
register(Nlora())
register(Inttune())
