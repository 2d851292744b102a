"""BLEU and NIST as the E2E NLG Challenge's `e2e-metrics` computes them (its Python port of
NIST's `mteval-v13a.pl`, `metrics/pymteval.py`): document-level scores over a corpus whose
segments each have one system output and one or more references.

What makes these numbers the challenge's and not, say, sacreBLEU's:
- mteval's basic tokenization (`tokenize`): punctuation split off, `.` and `,` kept inside
  numbers, a `-` after a digit split; matching is case-insensitive;
- BLEU (n ≤ 4): n-gram hits clipped by the largest count in any one reference, summed over the
  corpus with the output lengths `len - n + 1` (negative for outputs shorter than n: they are
  summed as they are); the brevity penalty uses, per segment, the reference closest in length
  (the shorter one on a tie), and applies when the total output length is at most the total
  reference length; a zero count becomes 1e-15 hits over at least 1e-9, so BLEU is never
  undefined (and tiny, not 0, when a 4-gram never matches);
- NIST (n ≤ 5): each matched n-gram weighs its information `log2(count(prefix) / count(n-gram))`
  over all references of the corpus (the 0-gram's count is the total reference length), the
  sum per n divided by the total output length for that n; the length penalty
  `exp(-β ln²(L_sys / L_ref))`, β = −ln 0.5 / ln² 1.5, compares the total output length with the
  sum over segments of the mean reference length.
Where the port would divide by a zero total output length for some n (a corpus of outputs
shorter than n), that term counts 0. Like the port, outputs shorter than n subtract from BLEU's
n-gram total, so on a tiny corpus of very short outputs a precision, and BLEU, can exceed 1
(`bleu(["A is here.", "B."], ...)` with both matched is 1e9 ** (1/4) ≈ 177.8); E2E's outputs
(about 20 tokens each) never come near that.

Example:
  >>> round(bleu(["the cat sat on the mat"], [["the cat sat on a mat", "a cat sat on the mat"]]), 6)
  0.955443
  >>> round(nist(["a b c d e"], [["a b c d e"]]), 6)  # log2(5): five unigrams seen once
  2.321928
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "nist", "nist_length_penalty", "tokenize"]

# Characters mteval splits off as tokens: {|}~ [\]^_` space!"#$%& ()*+ :;<=>?@ /
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_SGML = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
# NIST's β: the length penalty is 0.5 when the output is 2/3 of the reference length.
BETA = -math.log(0.5) / math.log(1.5) ** 2
# BLEU's floors for zero counts (hits, lengths).
_TINY, _SMALL = 1e-15, 1e-9


def tokenize(text: str) -> list[str]:
    """mteval-v13a's basic (Western-language) tokenization.

    Example:
      >>> tokenize("Strada, a pub near the river, costs £20-25.")
      ['Strada', ',', 'a', 'pub', 'near', 'the', 'river', ',', 'costs', '£20', '-', '25', '.']
    """
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for sgml, char in _SGML:
        text = text.replace(sgml, char)
    text = _PUNCT.sub(r" \1 ", f" {text} ")
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)  # . and , unless after a digit
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)  # . and , unless before a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # a dash after a digit
    return re.sub(r"\s+", " ", text).strip().split(" ")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    low = [t.lower() for t in tokens]
    return Counter(tuple(low[i : i + n]) for i in range(len(low) - n + 1))


def _max_counts(refs: Sequence[Sequence[str]], n: int) -> Counter:
    """For each n-gram, its largest count in any one reference."""
    out: Counter = Counter()
    for ref in refs:
        out |= _ngrams(ref, n)
    return out


def _segments(
    outputs: Sequence[str], references: Sequence[Sequence[str]]
) -> list[tuple[list[str], list[list[str]]]]:
    if len(outputs) != len(references):
        raise ValueError(
            f"outputs ({len(outputs)}) and references ({len(references)}): expected one list "
            "of references per output"
        )
    segments = []
    for i, (out, refs) in enumerate(zip(outputs, references, strict=True)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}]={refs!r}: expected a non-empty list of strings")
        segments.append((tokenize(out), [tokenize(r) for r in refs]))
    return segments


def bleu(
    outputs: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    max_n: int = 4,
    smoothing: float = 0.0,
) -> float:
    """Corpus BLEU in [0, 1] of `outputs` (one string per segment) against `references` (a list
    of reference strings per segment). `smoothing` adds to every count (1.0: Moses' sentence
    BLEU, as the port's segment-level sentBLEU)."""
    hits, lengths = [0] * max_n, [0] * max_n
    ref_len = 0
    for out, refs in _segments(outputs, references):
        for n in range(1, max_n + 1):
            clip = _max_counts(refs, n)
            hits[n - 1] += sum(min(c, clip[g]) for g, c in _ngrams(out, n).items())
            lengths[n - 1] += len(out) - n + 1
        ref_len += len(min(refs, key=lambda r: (abs(len(r) - len(out)), len(r))))
    log_precision = sum(
        math.log(max(h + smoothing, _TINY) / max(n + smoothing, _SMALL))
        for h, n in zip(hits, lengths, strict=True)
    )
    penalty = 1.0
    if lengths[0] <= ref_len:
        penalty = math.exp(1.0 - ref_len / (lengths[0] or 1e-5))
    return penalty * math.exp(log_precision / max_n)


def nist_length_penalty(output_len: float, ref_len: float) -> float:
    """NIST's length penalty: 1 for outputs at least as long as the references.

    Example:
      >>> round(nist_length_penalty(2, 3), 12)  # 2/3 of the reference length
      0.5
    """
    ratio = output_len / ref_len
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-BETA * math.log(ratio) ** 2)


def nist(outputs: Sequence[str], references: Sequence[Sequence[str]], *, max_n: int = 5) -> float:
    """Corpus NIST of `outputs` against `references` (as `bleu`'s arguments)."""
    segments = _segments(outputs, references)
    # Counts over every reference of the corpus; index 0 holds the total reference length.
    counts: list[Counter] = [Counter() for _ in range(max_n + 1)]
    lengths = [0] * max_n
    hits: list[list[Counter]] = [[] for _ in range(max_n)]
    avg_ref_len = 0.0
    for out, refs in segments:
        for n in range(1, max_n + 1):
            lengths[n - 1] += len(out) - n + 1
            clip = _max_counts(refs, n)
            hits[n - 1].append(Counter({g: min(c, clip[g]) for g, c in _ngrams(out, n).items()}))
            for ref in refs:
                counts[n].update(_ngrams(ref, n))
        total = sum(len(r) for r in refs)
        counts[0][()] += total
        avg_ref_len += total / len(refs)

    def info(gram: tuple[str, ...]) -> float:
        n = len(gram)
        if counts[n][gram] == 0:
            return 0.0
        return math.log2(counts[n - 1][gram[:-1]] / counts[n][gram])

    score = 0.0
    for n in range(max_n):
        if lengths[n] == 0:
            continue  # the port divides by zero here (outputs all shorter than n)
        weight = sum(info(g) * c for seg in hits[n] for g, c in seg.items() if c)
        score += weight / lengths[n]
    return nist_length_penalty(lengths[0], avg_ref_len) * score
