"""BLEU and NIST as the E2E challenge's `e2e-metrics` computes them (`jlora.metrics.mteval`):
each expected value is worked out by hand from the definitions in the module docstring. (Checked
once against e2e-metrics' own `metrics/pymteval.py` on the E2E dev set: BLEU identical to the
last bit, NIST within 3e-13; see the issue note.)"""

from __future__ import annotations

import math

import pytest

from jlora.metrics.mteval import BETA, bleu, nist, nist_length_penalty, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, world.", ["Hello", ",", "world", "."]),
        ("It costs £20-25 and 3.5 stars", ["It", "costs", "£20", "-", "25", "and", "3.5", "stars"]),
        ("family-friendly (yes)!", ["family-friendly", "(", "yes", ")", "!"]),
        ("it's &quot;fine&quot;", ["it's", '"', "fine", '"']),
        ("split-\nword\nnext", ["splitword", "next"]),
        ("", [""]),  # as mteval: one empty token
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_bleu_hand_worked():
    assert bleu(["a b c d"], [["a b c d"]]) == 1.0
    assert bleu(["A B C D"], [["a b c d"]]) == 1.0  # case-insensitive
    # 4/5, 3/4, 2/3, 1/2 n-gram precisions, equal lengths.
    assert bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(0.2**0.25, rel=1e-12)
    # Corpus-level: counts add up before dividing (8/9, 6/7, 4/5, 2/3), not an average.
    got = bleu(["a b c d e", "a b c d"], [["a b c d f"], ["a b c d"]])
    assert got == pytest.approx((8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25, rel=1e-12)
    # Brevity: 3 of 6 tokens; no 4-gram at all counts 1e-15 / 1e-9.
    got = bleu(["a b c"], [["a b c d e f"]])
    assert got == pytest.approx(math.exp(1 - 6 / 3) * 1e-6**0.25, rel=1e-12)
    # Clipping by the largest count in ONE reference, and the closest reference length (2, not
    # 5) for the brevity penalty: "the" 2/3, "the the" 1/2, no trigram (1e-15 / 1), no 4-gram.
    got = bleu(["the the the"], [["the cat", "a the the dog x"]])
    assert got == pytest.approx((2 / 3 * 1 / 2 * 1e-15 * 1e-6) ** 0.25, rel=1e-9)
    # Smoothing 1 (sentence BLEU): every count + 1, (5/6 · 4/5 · 3/4 · 2/3)^(1/4).
    got = bleu(["a b c d e"], [["a b c d f"]], smoothing=1.0)
    assert got == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, rel=1e-12)


def test_nist_hand_worked():
    assert nist(["a b c d e"], [["a b c d e"]]) == pytest.approx(math.log2(5), rel=1e-12)
    # Two segments. Reference counts over the corpus: 0-gram 8; a 2, b 3, c 2, d 1;
    # ab 2, bc 2, bd 1; abc 1, abd 1. Information: a = c = log2(8/2) = 2, b = log2(8/3),
    # ab = log2(2/2) = 0, bc = log2(3/2), abc = log2(2/1) = 1.
    got = nist(["a b c", "b c"], [["a b c", "a b d"], ["b c"]])
    b, bc = math.log2(8 / 3), math.log2(3 / 2)
    unigrams = (2 + b + 2 + b + 2) / 5  # hits a b c, b c over 3 + 2 output tokens
    bigrams = (0 + bc + bc) / 3  # ab bc, bc over 2 + 1 bigrams
    trigrams = 1 / 1  # abc over 1 + 0 trigrams; 4- and 5-grams: no hits
    assert got == pytest.approx(unigrams + bigrams + trigrams, rel=1e-12)  # lengths 5 = 3 + 2


def test_nist_length_penalty():
    assert nist_length_penalty(5, 5) == nist_length_penalty(7, 5) == 1.0
    assert nist_length_penalty(2, 3) == pytest.approx(0.5, rel=1e-12)  # β's definition
    assert nist_length_penalty(1, 2) == pytest.approx(math.exp(-BETA * math.log(0.5) ** 2))
    assert nist_length_penalty(0, 2) == 0.0
    # A short output is penalised: 3 of 6 tokens.
    got = nist(["a b c"], [["a b c d e f"]])
    assert got == pytest.approx(nist_length_penalty(3, 6) * math.log2(6), rel=1e-12)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match=r"outputs \(1\) and references \(2\)"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\]='a b': expected a non-empty list"):
        nist(["a b"], ["a b"])


def test_bleu_keeps_the_ports_short_output_quirk():
    """Outputs shorter than n subtract from the n-gram total (as e2e-metrics' port does): 4-gram
    hits 1 over 1 + (2 - 3) = 0 → floored to 1e-9, so BLEU = (1 · 1 · 1 · 1e9)^(1/4)."""
    got = bleu(["A is here.", "B."], [["A is here.", "Here is A."], ["B."]])
    assert got == pytest.approx(1e9**0.25, rel=1e-12)
