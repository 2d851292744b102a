"""Checks of a `Table`'s rows against what a task reads: columns, class labels, GSM8K answers.

Each check raises `jlora.errors.DataError` for the first bad row, in one line naming its file and
line (or Hub row), the value and what is allowed, so that bad data stops a run before the model
is loaded rather than training to NaN or scoring zero. `jlora.train.tasks.read_data` applies
them per task.

Example:
  >>> from jlora.data.sources import Table, _short
  >>> rows = [{"sentence": "fine", "label": 1}, {"sentence": "odd", "label": 7}]
  >>> table = Table("train.tsv", rows, lines=[2, 3])
  >>> require_columns(table, ("sentence", "label"))
  >>> check_labels(table, "label", (0, 1))
  Traceback (most recent call last):
  ...
  jlora.errors.DataError: train.tsv line 3: label=7; allowed: 0, 1
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import Any

from jlora.data.gsm8k import MARKERS, extract_answer
from jlora.data.sources import Table, _short
from jlora.errors import DataError

_INT = re.compile(r"\s*[-+]?\d+\s*")


def require_columns(table: Table, columns: Sequence[str], *, reader: str | None = None) -> None:
    """Every row has each of `columns`, with a value that is not null.

    `reader` names what reads them (e.g. "task 'sst2'") in the message.

    Example:
      >>> require_columns(Table("a.jsonl", [{"text": "x"}], lines=[1]), ("sentence",))
      Traceback (most recent call last):
      ...
      jlora.errors.DataError: a.jsonl line 1: no column 'sentence'; the row has: text
    """
    why = f" ({reader} reads {', '.join(columns)})" if reader else ""
    for i, row in enumerate(table.rows):
        missing = [c for c in columns if c not in row]
        if missing:
            names = ", ".join(repr(c) for c in missing)
            have = ", ".join(sorted(map(str, row))) or "no columns"
            raise DataError(
                f"{table.where(i)}: no column{'s' * (len(missing) > 1)} {names}{why}; "
                f"the row has: {have}"
            )
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise DataError(f"{table.where(i)}: {empty[0]} is null; expected a value{why}")


def _as_int(value: Any) -> int | None:
    """`value` as an int label (ints, integral floats, integer strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return None


def check_labels(table: Table, column: str, allowed: Sequence[int]) -> None:
    """Every row's `column` is an integer class label in `allowed` (a number of classes beyond
    the classifier's makes its cross-entropy NaN).

    Example:
      >>> check_labels(Table("t.tsv", [{"label": 1}, {"label": "0"}], lines=[2, 3]), "label",
      ...              (0, 1))
    """
    for i, row in enumerate(table.rows):
        if _as_int(row[column]) not in allowed:
            raise DataError(
                f"{table.where(i)}: {column}={_short(row[column])}; "
                f"allowed: {', '.join(map(str, allowed))}"
            )


def check_final_answers(table: Table, column: str, *, marker: bool) -> None:
    """Every row's `column` holds a GSM8K final answer `jlora.data.extract_answer` finds.

    With `marker` (training targets, which teach the model how to end its answer) the number
    must follow a final-answer marker (a `####` line, or MetaMathQA's `The answer is:`); without
    it (evaluation references) any number will do, since a reference without one can never be
    matched.

    Example:
      >>> check_final_answers(Table("t.jsonl", [{"answer": "So 4.\\n#### 4"}], lines=[1]),
      ...                     "answer", marker=True)
    """
    for i, row in enumerate(table.rows):
        text = row[column]
        found = isinstance(text, str) and extract_answer(text) is not None
        if found and (not marker or any(m in text for m in MARKERS)):
            continue
        need = "a final-answer line '#### <number>' (or MetaMathQA's 'The answer is: <number>')"
        if not marker:
            need = f"a number to score against, e.g. {need}"
        raise DataError(
            f"{table.where(i)}: {column}={_short(text)} has no final answer; expected {need}"
        )


def check_meaning_representations(table: Table, column: str) -> None:
    """Every row's `column` is an E2E meaning representation, `attribute[value]` pairs separated
    by commas (`jlora.data.e2e.parse_mr`).

    Example (the message goes on: "separated by commas, like 'name[The Vaults], ...'"):
      >>> check_meaning_representations(Table("d.csv", [{"mr": "name[A]"}, {"mr": "A pub"}],
      ...                               lines=[2, 3]), "mr")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jlora.errors.DataError: d.csv line 3: mr='A pub'; expected attribute[value] pairs ...
    """
    from jlora.data.e2e import parse_mr

    for i, row in enumerate(table.rows):
        try:
            parse_mr(str(row[column]))
        except ValueError as e:
            why = str(e).split(": ", 1)[1]
            raise DataError(f"{table.where(i)}: {column}={_short(row[column])}; {why}") from None
