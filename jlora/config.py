"""`AdapterConfig` and `Rule`: what to adapt and how, validated at construction.

Both are frozen, keyword-only and hashable, so a config can be a static argument of `jax.jit`.
Every invalid value fails in `__post_init__` with a `ValueError` that names the field, the value
and what is allowed.

Example:
  >>> import jlora
  >>> cfg = jlora.AdapterConfig(method="nlora", rank=8, targets=r".*/(query|value)/kernel")
  >>> cfg.rank
  8
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

METHODS = ("lora", "pissa", "slora", "nlora", "inttune", "nola", "gora")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AdapterConfig.{field}={value!r} is invalid: expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One target-selection rule; rules are tried in order and the first match wins."""

    # Regular expression matched with `re.fullmatch` against '/'-joined kernel paths,
    # e.g. "encoder/layer_0/attention/query/kernel".
    pattern: str
    # Rank for the kernels this rule selects; None uses `AdapterConfig.rank`. For `gora` this is
    # the reference rank r_ref of the parameter budget.
    rank: int | None = None
    # LoRA alpha for these kernels; None uses `AdapterConfig.alpha`.
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            _fail("targets", self.pattern, "a regular expression string")
        try:
            re.compile(self.pattern)
        except re.error as e:
            _fail("targets", self.pattern, f"a valid regular expression ({e})")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            _fail("targets[].rank", self.rank, "an integer >= 1 or None")
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            _fail("targets[].alpha", self.alpha, "a finite number > 0 or None")


def _is_rule_tuple(item: Any) -> bool:
    """True for one `(regex, rank[, alpha])` tuple, as opposed to a sequence of rules."""
    return (
        isinstance(item, tuple | list)
        and 2 <= len(item) <= 3
        and isinstance(item[0], str)
        and all(v is None or _is_number(v) for v in item[1:])
    )


def _as_rule(item: Any) -> Rule:
    if isinstance(item, Rule):
        return item
    if isinstance(item, str):
        return Rule(pattern=item)
    if _is_rule_tuple(item):
        return Rule(**dict(zip(("pattern", "rank", "alpha"), item, strict=False)))
    _fail("targets", item, "a regex string, a Rule, or a tuple (regex, rank, alpha)")
    raise AssertionError  # unreachable


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """How to adapt a model: the method, its rank and scale, and which kernels it targets."""

    # One of METHODS: "lora", "pissa", "slora", "nlora", "inttune", "nola", "gora".
    method: str = "lora"
    # Adapter rank r (for gora: the reference rank r_ref that sets the parameter budget).
    rank: int = 8
    # Scale numerator: s = alpha / r, or alpha / sqrt(r) with rslora and for gora.
    alpha: float = 16.0
    # Which kernels to adapt: a regex (re.fullmatch on '/'-joined kernel paths) or an ordered
    # sequence of rules `Rule` / `(regex, rank, alpha)`; the first matching rule wins. Normalised
    # to a tuple of `Rule`.
    targets: Any = r".*"
    # Dropout probability on the adapter input in the factored path (`jlora.inject(rng=...)`).
    dropout: float = 0.0
    # Rank-stabilised scale alpha / sqrt(r) (always on for gora).
    rslora: bool = False
    # Seed used by `jlora.init` when no key is passed.
    seed: int = 0
    # lora: "kaiming" (A ~ U(±1/sqrt(d_in))) or "gaussian" (A ~ N(0, 1/r^2), as PEFT).
    lora_init: str = "kaiming"
    # pissa: None = full SVD; an integer = randomized SVD with this many power iterations.
    pissa_niter: int | None = None
    # nlora/inttune core: "raw" (paper code: M = K[:r, :r], no residual) or "pinv" (textbook
    # Nyström core pinv(K[:r, :r]) with the residual written into the frozen kernel).
    nlora_core: str = "raw"
    # nlora/inttune columns/rows: "first" (the first r) or "random" (Gaussian sketches; needs
    # nlora_core="pinv").
    nlora_sampling: str = "first"
    # Relative cut-off of the Nyström pseudo-inverse: singular values below rcond·σ_max are
    # dropped. First-r CUR of a matrix without low-rank structure is ill-conditioned; measured on
    # random 1024² kernels, ‖C U⁺ R‖/‖K‖ is 57 at r=64 with 1e-4 and 4.3 with 1e-2.
    nlora_rcond: float = 1e-2
    # nola: numbers of random bases (k for A, l for B).
    nola_num_basis: tuple[int, int] = (256, 256)
    # nola: "regenerate" bases from their seed inside every step, or "cache" them as frozen leaves.
    nola_basis: str = "regenerate"
    # gora: (r_min, r_max) bounds of the allocated ranks.
    gora_rank_range: tuple[int, int] = (4, 32)
    # gora: step size gamma of the compressed-gradient B init.
    gora_gamma: float = 5e-2
    # gora: learning-rate ratio of B over A (LoRA+).
    gora_lr_ratio: float = 16.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {', '.join(METHODS)}")
        if not _is_int(self.rank) or self.rank < 1:
            _fail("rank", self.rank, "an integer >= 1")
        if not _is_number(self.alpha) or self.alpha <= 0:
            _fail("alpha", self.alpha, "a finite number > 0")
        targets = self.targets
        if isinstance(targets, str | Rule) or _is_rule_tuple(targets):
            targets = (targets,)
        if not isinstance(targets, Sequence) or not targets:
            _fail("targets", self.targets, "a regex string or a non-empty sequence of rules")
        object.__setattr__(self, "targets", tuple(_as_rule(t) for t in targets))
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a number in [0, 1)")
        if not isinstance(self.rslora, bool):
            _fail("rslora", self.rslora, "True or False")
        if not _is_int(self.seed):
            _fail("seed", self.seed, "an integer")
        if self.lora_init not in ("kaiming", "gaussian"):
            _fail("lora_init", self.lora_init, "'kaiming' or 'gaussian'")
        if self.pissa_niter is not None and (not _is_int(self.pissa_niter) or self.pissa_niter < 0):
            _fail("pissa_niter", self.pissa_niter, "None (full SVD) or an integer >= 0")
        if self.nlora_core not in ("raw", "pinv"):
            _fail("nlora_core", self.nlora_core, "'raw' or 'pinv'")
        if self.nlora_sampling not in ("first", "random"):
            _fail("nlora_sampling", self.nlora_sampling, "'first' or 'random'")
        if self.nlora_sampling == "random" and self.nlora_core != "pinv":
            _fail(
                "nlora_core",
                self.nlora_core,
                "'pinv' when nlora_sampling='random' (a sketched core needs its pseudo-inverse)",
            )
        if not _is_number(self.nlora_rcond) or not 0.0 <= self.nlora_rcond < 1.0:
            _fail("nlora_rcond", self.nlora_rcond, "a number in [0, 1)")
        nb = self.nola_num_basis
        if not (
            isinstance(nb, Sequence) and len(nb) == 2 and all(_is_int(v) and v >= 1 for v in nb)
        ):
            _fail("nola_num_basis", nb, "a pair (k, l) of integers >= 1")
        object.__setattr__(self, "nola_num_basis", tuple(nb))
        if self.nola_basis not in ("regenerate", "cache"):
            _fail("nola_basis", self.nola_basis, "'regenerate' or 'cache'")
        rr = self.gora_rank_range
        if not (
            isinstance(rr, Sequence)
            and len(rr) == 2
            and all(_is_int(v) for v in rr)
            and 1 <= rr[0] <= rr[1]
        ):
            _fail(
                "gora_rank_range", rr, "a pair (r_min, r_max) of integers with 1 <= r_min <= r_max"
            )
        object.__setattr__(self, "gora_rank_range", tuple(rr))
        if not _is_number(self.gora_gamma) or self.gora_gamma < 0:
            _fail("gora_gamma", self.gora_gamma, "a finite number >= 0")
        if not _is_number(self.gora_lr_ratio) or self.gora_lr_ratio <= 0:
            _fail("gora_lr_ratio", self.gora_lr_ratio, "a finite number > 0")

    def scale(self, rank: int, alpha: float) -> float:
        """The adapter scale s for a target of this rank and alpha."""
        if self.rslora or self.method == "gora":
            return alpha / math.sqrt(rank)
        return alpha / rank
