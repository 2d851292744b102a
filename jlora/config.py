"""`AdapterConfig` and `Rule`: what to adapt and how, validated at construction.

Both are frozen and hashable, so a config can be a static argument of `jax.jit`. Every invalid
value fails at construction with a `jlora.errors.ConfigError` (a `ValueError`) whose one-line
message names the field, the value and what is allowed; numbers must be finite and of the right
type (a bool is not an integer, a string is not a number), integers must fit their use (sizes in
int32, the seed in int64), and float fields are stored as `float`.

A method's own options live in its `Options` dataclass (`config.options`). They can be given as
that object, as a dict of its fields, or flat, as keywords named `<prefix>_<field>` the way YAML
writes them (`nola_num_basis=(4, 3)`); an option of another method is a `ConfigError` naming it,
and a keyword that is no method's option is a `TypeError`, as for any function.

Example:
  >>> import jlora
  >>> cfg = jlora.AdapterConfig(method="nola", rank=8, nola_num_basis=(64, 64))
  >>> cfg.options.num_basis, cfg.flat_options()
  ((64, 64), {'nola_num_basis': (64, 64), 'nola_basis': 'regenerate'})
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from jlora.methods import METHODS, Options, option_names
from jlora.validation import MAX_SIZE, SEED_RANGE
from jlora.validation import fail as _fail
from jlora.validation import is_int as _is_int
from jlora.validation import is_number as _is_number
from jlora.validation import is_sequence as _is_sequence
from jlora.validation import is_text as _is_text
from jlora.validation import one_line as _one_line

__all__ = ["MAX_SIZE", "METHODS", "SEED_RANGE", "AdapterConfig", "Rule"]


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


@dataclasses.dataclass(frozen=True, init=False)
class AdapterConfig:
    """How to adapt a model: the method, its rank and scale, which kernels it targets, and the
    method's options."""

    # A method name, a key of `jlora.METHODS`: "lora", "pissa", "slora", "nlora", "inttune",
    # "nola", "gora", or one registered with `jlora.methods.register`.
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
    # The method's options: an instance of `METHODS[method].options_class` (its defaults when
    # not given; a dict of its fields or flat `<prefix>_<field>` keywords also work).
    options: Options = None  # type: ignore[assignment]

    def __init__(
        self,
        *,
        method: str = "lora",
        rank: int = 8,
        alpha: float = 16.0,
        targets: Any = r".*",
        dropout: float = 0.0,
        rslora: bool = False,
        seed: int = 0,
        options: Options | Mapping[str, Any] | None = None,
        **flat_options: Any,
    ) -> None:
        unknown = [k for k in flat_options if k not in option_names()]
        if unknown:  # as Python reports an unknown keyword, before any value is checked
            raise TypeError(f"AdapterConfig got an unexpected keyword argument {unknown[0]!r}")
        for name, value in (
            ("method", method),
            ("rank", rank),
            ("alpha", alpha),
            ("targets", targets),
            ("dropout", dropout),
            ("rslora", rslora),
            ("seed", seed),
        ):
            object.__setattr__(self, name, value)
        self._check_generic()
        object.__setattr__(self, "options", self._options(options, flat_options))

    def _check_generic(self) -> None:
        if not _is_text(self.method, tuple(METHODS)):
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

    def _options(self, options: Any, flat: Mapping[str, Any]) -> Options:
        """The method's validated options from `options=` and the flat keywords."""
        cls = METHODS[self.method].options_class
        known = option_names()
        names = cls.flat_names()
        for key in flat:
            if key not in names:
                owners = ", ".join(known[key])
                mine = ", ".join(names) or "none"
                _fail(
                    key,
                    flat[key],
                    f"no such option for method {self.method!r} (an option of {owners}; "
                    f"{self.method}'s options: {mine})",
                )
        if options is None:
            options = cls()
        elif isinstance(options, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            bad = [k for k in options if k not in fields]
            if bad:
                _fail(
                    "options",
                    dict(options),
                    f"fields of {cls.__name__} ({', '.join(sorted(fields)) or 'none'}), "
                    f"not {bad[0]!r}",
                )
            options = cls(**options)
        elif type(options) is not cls:
            _fail(
                "options",
                options,
                f"a {cls.__name__} (the options of method {self.method!r}), a dict of its "
                "fields, or None",
            )
        if flat:
            options = dataclasses.replace(options, **{names[k]: v for k, v in flat.items()})
        return options

    def _float(self, field: str, ok: Callable[[float], bool], allowed: str) -> None:
        """Checks that `field` is a finite int or float with `ok(value)`; stores it as `float`."""
        value = getattr(self, field)
        if not _is_number(value) or not ok(float(value)):
            _fail(field, value, allowed)
        object.__setattr__(self, field, float(value))

    @property
    def method_impl(self) -> Any:
        """The registered `jlora.methods.Method` of `method`."""
        return METHODS[self.method]

    def flat_options(self) -> dict[str, Any]:
        """The options as `{<prefix>_<field>: value}`, the form YAML and keywords use."""
        return self.options.to_flat()

    def to_flat(self) -> dict[str, Any]:
        """Every field, the options flat: `AdapterConfig(**cfg.to_flat()) == cfg`."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"
        }
        return {**out, **self.flat_options()}

    def scale(self, rank: int, alpha: float) -> float:
        """The adapter scale s for a target of this rank and alpha (the method decides)."""
        return METHODS[self.method].scale(rank, alpha, self)
