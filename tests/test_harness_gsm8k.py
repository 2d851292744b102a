"""GSM8K scored by lm-evaluation-harness's convention (`jlora.data.harness`): each expected value
below is worked out by hand from the task's regexes and `regexes_to_ignore`."""

from __future__ import annotations

import pytest

from jlora.data import exact_match, harness

REF_72 = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72.\n#### 72"
)


@pytest.mark.parametrize(
    ("generation", "reference", "strict", "flexible"),
    [
        # The model writes GSM8K's own format: both filters find 72.
        ("48 + 24 = 72\n#### 72", REF_72, True, True),
        # No `####`: strict falls back to "[invalid]"; flexible takes the last number.
        ("48 + 24 = 72 clips", REF_72, False, True),
        # Several numbers: flexible takes the LAST one, strict the FIRST `####`.
        ("#### 72 or maybe #### 73, total 74", REF_72, True, False),
        # Negative answers keep their sign; a spaced minus is an operator, not a sign.
        ("10 - 15 = -5\n#### -5", "#### -5", True, True),
        ("15 - 10 = 5 so - 5", "#### -5", False, False),
        # Thousands separators and `$` are ignored on both sides.
        ("It costs $1,234.", "#### 1234", False, True),
        ("#### $1,234", "#### 1,234", False, True),  # strict: no `$` after "#### "
        ("#### 1,234", "#### 1234", True, True),
        # Strings, not values: a decimal must be written as the reference writes it.
        ("#### 18.00", "#### 18", False, False),
        ("The total is 12.5.", "#### 12.5", False, True),
        ("The total is $12.50.", "#### 12.5", False, False),
        # The generation stops at the next "Question:" (the harness's `until`).
        ("#### 3\n\nQuestion: how many?\nAnswer: #### 4", "#### 3", True, True),
        ("so 3\nQuestion: 4 + 4? 8", "#### 3", False, True),
        # Nothing numeric.
        ("I do not know.", "#### 3", False, False),
    ],
)
def test_tricky_answers(generation, reference, strict, flexible):
    got = harness.score(generation, reference)
    assert got == {"strict-match": strict, "flexible-extract": flexible}


def test_extractions_and_cleaning():
    assert harness.extract("#### 1,234.5 and #### 7", "strict-match") == "1,234.5"
    assert harness.extract("a 7 b 42.", "flexible-extract") == "42."
    assert harness.extract("x", "flexible-extract") == harness.FALLBACK
    assert harness.clean("#### 42.") == "42"
    assert harness.clean(REF_72) == "72"  # everything up to the last "#### " goes
    with pytest.raises(ValueError, match=r"filter 'loose': expected one of"):
        harness.extract("1", "loose")


def test_differs_from_jloras_value_comparison_where_documented():
    """jlora's own score compares values; the harness compares strings."""
    assert exact_match("#### 18.00", "#### 18")
    assert not any(harness.score("#### 18.00", "#### 18").values())


def test_accuracy_and_prompt():
    acc = harness.accuracy(["#### 3", "it is 4", "#### 5"], ["#### 3", "#### 4", "#### 6"])
    assert acc == {"strict-match": pytest.approx(1 / 3), "flexible-extract": pytest.approx(2 / 3)}
    shots = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    assert harness.fewshot_prompt("2 + 2?", shots) == (
        "Question: 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: 2 + 2?\nAnswer:"
    )
    assert harness.fewshot_prompt("2 + 2?") == "Question: 2 + 2?\nAnswer:"
    with pytest.raises(ValueError):
        harness.accuracy(["#### 3"], [])
