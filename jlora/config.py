"""`AdapterConfig` and `Rule`: what to adapt and how, validated at construction.

Both are frozen, keyword-only and hashable, so a config can be a static argument of `jax.jit`.
Every invalid value fails in `__post_init__` with a `jlora.errors.ConfigError` (a `ValueError`)
whose one-line message names the field, the value and what is allowed; numbers must be finite
and of the right type (a bool is not an integer, a string is not a number), integers must fit
their use (sizes in int32, the seed in int64), and float fields are stored as `float`. An
unknown keyword is a `TypeError` from Python, as for any function.

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
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from jlora.errors import ConfigError

METHODS = ("lora", "pissa", "slora", "nlora", "inttune", "nola", "gora")

# Largest size (rank, number of bases, power iterations): shapes and loop counts are int32.
MAX_SIZE = 2**31 - 1
# Range of `seed`: `jax.random.key` takes a signed 64-bit integer.
SEED_RANGE = (-(2**63), 2**63 - 1)
# Longest value representation a message shows before it is cut with "...".
_MAX_SHOWN = 200


def _one_line(text: str) -> str:
    """`text` with every line break or other unprintable character backslash-escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: Any) -> str:
    """`repr(value)` on one line and at most `_MAX_SHOWN` characters, whatever the value."""
    try:
        text = _one_line(repr(value))
    except Exception:  # e.g. an int over Python's 4300-digit str limit
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def _fail(field: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"AdapterConfig.{field}={_show(value)} is invalid: expected {allowed}")


def _is_int(v: Any, lo: int = 0, hi: int = MAX_SIZE) -> bool:
    """True for an `int` (not a bool) in [lo, hi]."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    """True for a finite `int` or `float` (not a bool); an int beyond float range is not."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_text(v: Any, allowed: tuple[str, ...]) -> bool:
    """True for a `str` that is one of `allowed` (no other type is compared)."""
    return isinstance(v, str) and v in allowed


def _is_pair(v: Any) -> bool:
    """True for a sequence (not a string or bytes) of two sizes (ints in [1, MAX_SIZE])."""
    return _is_sequence(v) and len(v) == 2 and all(_is_int(x, 1) for x in v)


def _is_sequence(v: Any) -> bool:
    """True for a tuple, list or other `Sequence` that is not text or bytes."""
    return isinstance(v, Sequence) and not isinstance(v, str | bytes | bytearray)


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
            _fail("targets", self.pattern, f"a valid regular expression ({_one_line(str(e))})")
        except OverflowError as e:  # a repetition count over the engine's limit
            _fail("targets", self.pattern, f"a valid regular expression ({e})")
        except RecursionError:
            _fail("targets", self.pattern, "a valid regular expression (too deeply nested)")
        if self.rank is not None and not _is_int(self.rank, 1):
            _fail("targets[].rank", self.rank, f"an integer >= 1 (at most {MAX_SIZE}) or None")
        if self.alpha is not None:
            if not _is_number(self.alpha) or self.alpha <= 0:
                _fail("targets[].alpha", self.alpha, "a finite number > 0 or None")
            object.__setattr__(self, "alpha", float(self.alpha))


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
    # pissa with pissa_niter: extra sketch columns beyond r (Halko et al.'s oversampling; more
    # accurate). 0 runs PEFT's `pissa_niter_k` algorithm (`torch.svd_lowrank` with q = r).
    pissa_oversample: int = 8
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
        if not _is_text(self.method, METHODS):
            _fail("method", self.method, f"one of {', '.join(METHODS)}")
        if not _is_int(self.rank, 1):
            _fail("rank", self.rank, f"an integer >= 1 (at most {MAX_SIZE})")
        self._float("alpha", lambda v: v > 0, "a finite number > 0")
        targets = self.targets
        if isinstance(targets, str | Rule) or _is_rule_tuple(targets):
            targets = (targets,)
        if not _is_sequence(targets) or not targets:
            _fail("targets", self.targets, "a regex string or a non-empty sequence of rules")
        object.__setattr__(self, "targets", tuple(_as_rule(t) for t in targets))
        self._float("dropout", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        if not isinstance(self.rslora, bool):
            _fail("rslora", self.rslora, "True or False")
        if not _is_int(self.seed, *SEED_RANGE):
            _fail("seed", self.seed, "an integer in [-2**63, 2**63 - 1]")
        if not _is_text(self.lora_init, ("kaiming", "gaussian")):
            _fail("lora_init", self.lora_init, "'kaiming' or 'gaussian'")
        if self.pissa_niter is not None and not _is_int(self.pissa_niter):
            _fail(
                "pissa_niter",
                self.pissa_niter,
                f"None (full SVD) or an integer >= 0 (at most {MAX_SIZE})",
            )
        if not _is_int(self.pissa_oversample):
            _fail(
                "pissa_oversample", self.pissa_oversample, f"an integer >= 0 (at most {MAX_SIZE})"
            )
        if not _is_text(self.nlora_core, ("raw", "pinv")):
            _fail("nlora_core", self.nlora_core, "'raw' or 'pinv'")
        if not _is_text(self.nlora_sampling, ("first", "random")):
            _fail("nlora_sampling", self.nlora_sampling, "'first' or 'random'")
        if self.nlora_sampling == "random" and self.nlora_core != "pinv":
            _fail(
                "nlora_core",
                self.nlora_core,
                "'pinv' when nlora_sampling='random' (a sketched core needs its pseudo-inverse)",
            )
        self._float("nlora_rcond", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        if not _is_pair(self.nola_num_basis):
            _fail(
                "nola_num_basis",
                self.nola_num_basis,
                f"a pair (k, l) of integers >= 1 (at most {MAX_SIZE})",
            )
        object.__setattr__(self, "nola_num_basis", tuple(self.nola_num_basis))
        if not _is_text(self.nola_basis, ("regenerate", "cache")):
            _fail("nola_basis", self.nola_basis, "'regenerate' or 'cache'")
        rr = self.gora_rank_range
        if not (_is_pair(rr) and rr[0] <= rr[1]):
            _fail(
                "gora_rank_range",
                rr,
                f"a pair (r_min, r_max) of integers with 1 <= r_min <= r_max <= {MAX_SIZE}",
            )
        object.__setattr__(self, "gora_rank_range", tuple(rr))
        self._float("gora_gamma", lambda v: v >= 0, "a finite number >= 0")
        self._float("gora_lr_ratio", lambda v: v > 0, "a finite number > 0")

    def _float(self, field: str, ok: Callable[[float], bool], allowed: str) -> None:
        """Checks that `field` is a finite int or float with `ok(value)`; stores it as `float`."""
        value = getattr(self, field)
        if not _is_number(value) or not ok(float(value)):
            _fail(field, value, allowed)
        object.__setattr__(self, field, float(value))

    def scale(self, rank: int, alpha: float) -> float:
        """The adapter scale s for a target of this rank and alpha."""
        if self.rslora or self.method == "gora":
            return alpha / math.sqrt(rank)
        return alpha / rank
