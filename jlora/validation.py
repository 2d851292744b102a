"""Checks shared by every validated config (`AdapterConfig`, `Rule`, each method's options).

A failed check raises `jlora.errors.ConfigError` (a `ValueError`) with a one-line message in one
format, `AdapterConfig.<field>=<value> is invalid: expected <what is allowed>`, which the run
config of `train.py` rewrites to `adapter.<field>`.

Example:
  >>> from jlora.validation import is_pair
  >>> is_pair((4, 32)), is_pair((4, 0)), is_pair("ab")
  (True, False, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

from jlora.errors import ConfigError

# Largest size (rank, number of bases, power iterations): shapes and loop counts are int32.
MAX_SIZE = 2**31 - 1
# Range of `seed`: `jax.random.key` takes a signed 64-bit integer.
SEED_RANGE = (-(2**63), 2**63 - 1)
# Longest value representation a message shows before it is cut with "...".
_MAX_SHOWN = 200


def one_line(text: str) -> str:
    """`text` with every line break or other unprintable character backslash-escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show(value: Any) -> str:
    """`repr(value)` on one line and at most 200 characters, whatever the value."""
    try:
        text = one_line(repr(value))
    except Exception:  # e.g. an int over Python's 4300-digit str limit
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def fail(field: str, value: Any, allowed: str) -> NoReturn:
    """Raises the ConfigError of an invalid `AdapterConfig` field (or method option)."""
    raise ConfigError(f"AdapterConfig.{field}={show(value)} is invalid: expected {allowed}")


def is_int(v: Any, lo: int = 0, hi: int = MAX_SIZE) -> bool:
    """True for an `int` (not a bool) in [lo, hi]."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_number(v: Any) -> bool:
    """True for a finite `int` or `float` (not a bool); an int beyond float range is not."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def is_text(v: Any, allowed: tuple[str, ...]) -> bool:
    """True for a `str` that is one of `allowed` (no other type is compared)."""
    return isinstance(v, str) and v in allowed


def is_sequence(v: Any) -> bool:
    """True for a tuple, list or other `Sequence` that is not text or bytes."""
    return isinstance(v, Sequence) and not isinstance(v, str | bytes | bytearray)


def is_pair(v: Any) -> bool:
    """True for a sequence (not a string or bytes) of two sizes (ints in [1, MAX_SIZE])."""
    return is_sequence(v) and len(v) == 2 and all(is_int(x, 1) for x in v)


def as_float(field: str, value: Any, ok: Any, allowed: str) -> float:
    """`value` as a float if it is a finite int or float with `ok(value)`; else `fail`."""
    if not is_number(value) or not ok(float(value)):
        fail(field, value, allowed)
    return float(value)
