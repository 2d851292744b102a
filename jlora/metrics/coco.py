"""METEOR, ROUGE-L and CIDEr as the E2E challenge's `e2e-metrics` computes them: through the
COCO caption evaluation code (`pycocoevalcap`, an optional dependency: `pip install
pycocoevalcap`, in jlora's `parity` extra) exactly as its `COCOEvalCap.evaluate` runs it.

Both the outputs and the references are first tokenized by Stanford's PTBTokenizer
(`-preserveLines -lowerCase`, punctuation tokens dropped), then METEOR 1.5 (`-l en -norm`),
ROUGE-L (LCS F-measure, β = 1.2, the best precision and recall over the references) and
CIDEr-D (σ = 6, document frequencies over the corpus's references) score each segment; the
corpus score is METEOR's own aggregate and the mean of the other two. The tokenizer and
METEOR are Java programs shipped inside `pycocoevalcap`: without a `java` on the PATH (Debian:
`apt-get install default-jre-headless`) or without `pycocoevalcap`, these metrics cannot be
computed as the challenge does and are reported as missing (None), never as 0. One METEOR
process serves every call in a Python process (started by the first; replaced if it dies).

Example:
  >>> scores = coco_scores(["the cat sat"], [["the cat sat on the mat"]])  # doctest: +SKIP
  >>> round(scores["ROUGE_L"], 6)  # doctest: +SKIP
  0.628866
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["METRICS", "available", "coco_scores"]

METRICS = ("METEOR", "ROUGE_L", "CIDEr")


def available() -> str | None:
    """None when the COCO metrics can run here, else why not (for logs and skips)."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return (
            "no java on the PATH (PTBTokenizer and METEOR are Java programs; Debian: apt-get "
            "install default-jre-headless)"
        )
    return None


def coco_scores(
    outputs: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float | None]:
    """`{"METEOR", "ROUGE_L", "CIDEr"}` of `outputs` (one per segment) against `references`
    (a list of strings per segment); every value None when `available()` says why not."""
    if len(outputs) != len(references):
        raise ValueError(
            f"outputs ({len(outputs)}) and references ({len(references)}): expected one list "
            "of references per output"
        )
    why = available()
    if why is not None:
        log.warning("METEOR, ROUGE_L and CIDEr are missing: %s", why)
        return dict.fromkeys(METRICS)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The COCO format e2e-metrics builds: one "image" per segment, its references as captions.
    ids = [f"inst-{i}" for i in range(len(outputs))]
    gts = {i: [{"caption": r} for r in refs] for i, refs in zip(ids, references, strict=True)}
    res = {i: [{"caption": out}] for i, out in zip(ids, outputs, strict=True)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out: dict[str, float | None] = {"METEOR": float(_meteor_score(gts, res))}
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        score, _ = scorer.compute_score(gts, res)
        out[name] = float(score)
    return out


# One METEOR process per Python process, started by the first call: its start (a JVM loading
# METEOR's paraphrase tables) takes ~5 s, scoring a corpus with it milliseconds, and a run
# scores at each evaluation. Each call is independent (`-stdio`: SCORE lines, then one EVAL).
_meteor: Any = None


def _meteor_score(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:  # first call, or it has died
        _meteor = Meteor()
    try:
        score, _ = _meteor.compute_score(gts, res)
    except BaseException:
        # A failed call may leave the scorer's lock held (pycocoevalcap releases it only on
        # success) and its pipes mid-exchange: drop that process; the next call starts another.
        failed, _meteor = _meteor, None
        if failed.lock.locked():
            failed.lock.release()
        failed.meteor_p.kill()
        raise
    return score
