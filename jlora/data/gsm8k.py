"""GSM8K answer extraction and exact-match scoring.

A reference answer ends with `#### <number>` (GSM8K) or `The answer is: <number>` (MetaMathQA,
which the papers' LLaMA runs train on). A text is scored by the first number after its first
final-answer marker (`MARKERS`) if it wrote one, else by the last number in the text, as
MetaMath's and PiSSA's evaluation scripts read `The answer is: `. Numbers are normalised
before comparison: `$`, thousands separators and a trailing `.` are dropped, and equal values
compare equal ("18.00" == "18", "1,234" == "1234").

Example:
  >>> extract_answer("She pays 3 * $6 = $<<3*6=18>>18.\\n#### 18")
  '18'
  >>> exact_match("So the total is $1,234.00.", "... #### 1234")
  True
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Final-answer markers: GSM8K's references, and MetaMathQA's responses (and so the generations
# of a model trained on them).
MARKERS = ("####", "The answer is")
_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))
# A number: optional minus (not a hyphen inside a word), optional `$`, digits with optional
# comma thousands groups, optional decimals; `.5` counts too.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: no `$`/commas/trailing dot, integral values as ints.

    Example:
      >>> normalize_number("$1,234.50"), normalize_number("-18.00"), normalize_number("x")
      ('1234.5', '-18', None)
    """
    s = text.strip().replace("$", "").replace(",", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised final answer: the first number after the first final-answer marker
    (`####`, `The answer is`), else the last number.

    Returns None when the text holds no number (or nothing numeric after the marker).

    Example:
      >>> extract_answer("So 1,234."), extract_answer("#### $18.00")
      ('1234', '18')
      >>> extract_answer("The answer is: 7\\n\\nQ: 2 + 2?"), extract_answer("no idea") is None
      ('7', True)
    """
    marker = _MARKER.search(text)
    if marker is not None:
        numbers = _NUMBER.findall(text[marker.end() :])
        return normalize_number(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(prediction_text: str, reference_text: str) -> bool:
    """Whether a generation's final answer equals the reference's (False if either has none).

    Example:
      >>> exact_match("18 dollars", "#### 18"), exact_match("#### 17", "#### 18")
      (True, False)
    """
    reference = extract_answer(reference_text)
    return reference is not None and extract_answer(prediction_text) == reference
