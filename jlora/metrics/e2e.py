"""The E2E NLG Challenge's five metrics, as its `e2e-metrics` script (`measure_scores.py`, with
`-p`: the Python mteval) computes them: BLEU and NIST (`jlora.metrics.mteval`), METEOR,
ROUGE-L and CIDEr (`jlora.metrics.coco`, None where Java or `pycocoevalcap` is missing).

The references of one meaning representation (MR) form one segment: `group_references` groups
the data's `(mr, ref)` rows by MR, as the script does when the system output names its MRs.

Example:
  >>> mrs, refs = group_references([("name[A]", "A is a pub in the city centre."),
  ...     ("name[B]", "B is a cheap coffee shop."), ("name[A]", "A is a city centre pub.")])
  >>> mrs, refs[0]
  (['name[A]', 'name[B]'], ['A is a pub in the city centre.', 'A is a city centre pub.'])
  >>> s = scores(["A is a city centre pub.", "B is a cheap coffee shop."], refs, with_coco=False)
  >>> s["BLEU"], s["METEOR"]
  (1.0, None)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jlora.metrics import coco, mteval

__all__ = ["METRICS", "group_references", "scores"]

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def group_references(rows: Iterable[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """`(mrs, references)`: each distinct MR once, in order of first appearance, with all its
    references in file order."""
    grouped: dict[str, list[str]] = {}
    for mr, ref in rows:
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())


def scores(
    outputs: Sequence[str], references: Sequence[Sequence[str]], *, with_coco: bool = True
) -> dict[str, float | None]:
    """`{metric: score}` for `METRICS`, one output per segment (MR). `with_coco=False` skips
    METEOR, ROUGE-L and CIDEr (None; they start Java, which takes seconds)."""
    out: dict[str, float | None] = {
        "BLEU": mteval.bleu(outputs, references),
        "NIST": mteval.nist(outputs, references),
    }
    if with_coco:
        out.update(coco.coco_scores(outputs, references))
    else:
        out.update(dict.fromkeys(coco.METRICS))
    return out
